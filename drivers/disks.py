"""Disk calls of a host (domains/<name>/disks/<target>/).  Mixed into `Host`.

A disk is addressed by its domain's UUID and its target (`vda`, `sda`, `hdc`), as libvirt's
block calls address it.  What the tree shows of a disk comes from libvirt alone: its
element in the domain's XML (the definition, and the live one while running, whose
`backingStore` elements are the backing chain libvirt found), `blockInfo`, `diskErrors`,
`blockStatsFlags` and `blockJobInfo` (and, once a job has ended, how it ended: libvirt's
BLOCK_JOB_2 event, kept by drivers/blockjobs.py); a qcow2 image's stored backing name
comes from its header, downloaded through libvirt's storage API (drivers/backingnames.py).
The words of a disk's `control` (nodes/words.py DISK_WORDS) become blockCommit,
blockRebase, blockCopy, blockJobAbort and blockResize with the flags of the tables below.
"""

from __future__ import annotations

import copy
import errno
import re
import textwrap
from typing import TYPE_CHECKING, Any

import libvirt
import trio
from lxml import etree

from libvirtfs.drivers import backingnames, xmldocs
from libvirtfs.drivers.errors import DriverError

if TYPE_CHECKING:
    from libvirtfs.drivers.blockjobs import BlockJobOutcomes
    from libvirtfs.drivers.connection import Connection

Info = dict[str, Any]

# libvirt's virDomainBlockJobType, as the `job` file says it.
JOB_TYPES = {0: "unknown", 1: "pull", 2: "copy", 3: "commit", 4: "active-commit", 5: "backup"}
# virDomainDiskErrorCode
DISK_ERRORS = {0: "none", 1: "unspecified", 2: "no-space"}
# The words of nodes/words.py DISK_MODIFIERS -> flags, per call.
COMMIT_FLAGS = {"shallow": libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW,
                "delete": libvirt.VIR_DOMAIN_BLOCK_COMMIT_DELETE,
                "relative": libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE}
PULL_FLAGS = {"relative": libvirt.VIR_DOMAIN_BLOCK_REBASE_RELATIVE}
COPY_FLAGS = {"shallow": libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW,
              "reuse-ext": libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT}
# Which modifiers each word takes (besides bandwidth= and wait, which the node checks).
MODIFIERS = {"commit": COMMIT_FLAGS, "commit-active": COMMIT_FLAGS, "pull": PULL_FLAGS,
             "copy": COPY_FLAGS}
# How often `wait` asks libvirt whether a job is ready or gone.
WAIT_POLL_SECONDS = 0.2
MAX_WAIT_SECONDS = 3600.0
_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def parse_size(text: str) -> int:
    """`resize SIZE`: bytes, or a number with K, M, G or T (powers of 1024)."""
    found = _SIZE.match(text)
    if found is None:
        raise DriverError(errno.EINVAL, f"resize: {text!r} is not a size (bytes, or a number "
                                        f"with K, M, G or T: 64M)")
    return int(found.group(1)) * _UNITS[found.group(2).upper()]


def _domain(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain:
    return conn.lookupByUUIDString(uuid)


def _document(dom: libvirt.virDomain, *, live: bool) -> etree._Element:
    """The domain's live XML, or its definition (the live one for a transient domain)."""
    inactive = not live and dom.isPersistent()
    return xmldocs.from_libvirt(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0))


def _targets(root: etree._Element) -> list[str]:
    return [str(t) for t in root.xpath("devices/disk/target/@dev")]


def _find(root: etree._Element, target: str) -> etree._Element | None:
    for disk in root.iterfind("devices/disk"):
        found = disk.find("target")
        if found is not None and found.get("dev") == target:
            return disk
    return None


def _element(dom: libvirt.virDomain, target: str, *, live: bool) -> etree._Element:
    """The disk's element: live (while running) or from the definition; a disk only one of
    them has (plugged for now, or for the next start) is shown from that one."""
    active = bool(dom.isActive())
    for use_live in [True, False] if live else [False, True]:
        if use_live and not active:
            continue
        found = _find(_document(dom, live=use_live), target)
        if found is not None:
            return found
    raise DriverError(errno.ENOENT, f"domain {dom.name()!r} has no disk {target!r}")


def render(element: etree._Element) -> str:
    """The element alone, indented from the left margin."""
    element = copy.deepcopy(element)
    element.tail = None
    etree.indent(element, space="  ")
    return etree.tostring(element, encoding=str) + "\n"


def _source(element: etree._Element) -> str:
    """Where an image is: a file, a block device, a volume, or a network name."""
    source = element.find("source")
    if source is None:
        return "-"
    for attribute in ("file", "dev", "dir"):
        if source.get(attribute):
            return source.get(attribute)
    if source.get("volume"):
        return f"{source.get('pool')}/{source.get('volume')}"
    if source.get("protocol"):
        return f"{source.get('protocol')}:{source.get('name', '')}"
    return "-"


def list_disks(conn: libvirt.virConnect, uuid: str) -> list[str]:
    """The targets of the domain's disks: live ones first while running, then those only
    the definition has."""
    dom = _domain(conn, uuid)
    targets = _targets(_document(dom, live=True)) if dom.isActive() else []
    targets += [t for t in _targets(_document(dom, live=False)) if t not in targets]
    return targets


_DISK_BLOCK = re.compile(r"^( *)<disk\b.*?^\1</disk>\n", re.MULTILINE | re.DOTALL)


def disk_xml(conn: libvirt.virConnect, uuid: str, target: str, live: bool) -> str:
    """The disk's element as libvirt wrote it (its quoting, its order), from the left
    margin."""
    dom = _domain(conn, uuid)
    element = _element(dom, target, live=live)
    dev = element.find("target").get("dev")
    for use_live in (True, False) if live else (False, True):
        if use_live and not dom.isActive():
            continue
        inactive = not use_live and dom.isPersistent()
        text = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)
        for block in _DISK_BLOCK.finditer(text):
            if re.search(rf"<target dev=(['\"]){re.escape(dev)}\1", block.group(0)):
                return textwrap.dedent(block.group(0))
    return render(element)


def disk_info(conn: libvirt.virConnect, uuid: str, target: str) -> Info:
    dom = _domain(conn, uuid)
    disk = _element(dom, target, live=True)
    driver = disk.find("driver")
    info: Info = {
        "device": disk.get("device", "disk"),
        "bus": disk.find("target").get("bus", "-"),
        "source": _source(disk),
        "format": driver.get("type", "-") if driver is not None else "-",
    }
    try:
        capacity, allocation, physical = dom.blockInfo(target, 0)
        info.update(capacity=capacity, allocation=allocation, physical=physical)
    except libvirt.libvirtError:
        pass  # an empty CD-ROM drive, a network disk of an inactive domain: nothing to size
    info["read-only"] = disk.find("readonly") is not None
    info["shareable"] = disk.find("shareable") is not None
    errors = "none"
    if dom.isActive():
        try:
            errors = DISK_ERRORS.get(dom.diskErrors(0).get(target, 0), "unknown")
        except libvirt.libvirtError:
            errors = "unknown"
    info["errors"] = errors
    return info


def disk_chain(conn: libvirt.virConnect, uuid: str, target: str) -> list[str]:
    """`TARGET[INDEX] FORMAT SOURCE [backing=NAME]` per image, top first, as libvirt
    reports the chain: the live XML's backingStore elements while running (libvirt probes
    the chain when the domain starts and follows every block job), the definition's
    otherwise.  NAME is the backing name a qcow2 image stores, read through libvirt's
    storage API (drivers/backingnames.py): one download per qcow2 image libvirt knows as
    a volume."""
    disk = _element(_domain(conn, uuid), target, live=True)
    driver = disk.find("driver")
    source = disk.find("source")
    index = source.get("index") if source is not None else None
    images = [(f"{target}[{index}]" if index else target,
               driver.get("type", "-") if driver is not None else "-", disk)]
    store = disk.find("backingStore")
    while store is not None and store.find("source") is not None:
        fmt = store.find("format")
        images.append((f"{target}[{store.get('index')}]" if store.get("index") else "-",
                       fmt.get("type", "-") if fmt is not None else "-", store))
        store = store.find("backingStore")
    lines = []
    for name, fmt, image in images:
        line = f"{name} {fmt} {_source(image)}"
        stored = backingnames.stored_backing(conn, image) if fmt == "qcow2" else None
        lines.append(line if stored is None else f"{line} backing={stored}")
    return lines


def disk_stats(conn: libvirt.virConnect, uuid: str, target: str) -> Info:
    """blockStatsFlags (blockStats where that is all the hypervisor has); nothing while
    the domain is not running."""
    dom = _domain(conn, uuid)
    if not dom.isActive():
        _element(dom, target, live=False)  # ENOENT for a disk that is not there
        return {}
    try:
        stats = dom.blockStatsFlags(target, 0)
        return {key.replace("_", "-"): value for key, value in stats.items()}
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
    rd_req, rd_bytes, wr_req, wr_bytes, errs = dom.blockStats(target)
    return {"rd-operations": rd_req, "rd-bytes": rd_bytes, "wr-operations": wr_req,
            "wr-bytes": wr_bytes, "errors": errs}


def _mirror_ready(dom: libvirt.virDomain, target: str) -> bool:
    disk = _find(_document(dom, live=True), target)
    mirror = disk.find("mirror") if disk is not None else None
    return mirror is not None and mirror.get("ready") == "yes"


def disk_job(conn: libvirt.virConnect, uuid: str, target: str) -> Info:
    """blockJobInfo as `key: value` lines; {} when no block job runs."""
    dom = _domain(conn, uuid)
    if not dom.isActive():
        return {}
    try:
        job = dom.blockJobInfo(target, 0)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            return {}  # a hypervisor without block jobs runs none
        raise
    if not job:
        return {}
    cur, end = job.get("cur", 0), job.get("end", 0)
    kind = JOB_TYPES.get(job.get("type", 0), "unknown")
    return {
        "type": kind,
        "cur": cur,
        "end": end,
        "percent": min(100, cur * 100 // end) if end else 0,
        "bandwidth": job.get("bandwidth", 0),
        "ready": kind in ("copy", "active-commit") and _mirror_ready(dom, target),
    }


def _bandwidth(modifiers: dict[str, str]) -> int:
    text = modifiers.get("bandwidth", "0")
    if not text.isdigit():
        raise DriverError(errno.EINVAL, f"bandwidth={text}: MiB/s, a whole number")
    return int(text)


def _flags(word: str, words: list[str]) -> int:
    table = MODIFIERS.get(word, {})
    flags = 0
    for modifier in words:
        if modifier not in table:
            raise DriverError(errno.EINVAL, f"{word} takes no {modifier!r}; it takes "
                                            f"{', '.join([*table, 'bandwidth=MIB_PER_S', 'wait'])}")
        flags |= table[modifier]
    return flags


def start(conn: libvirt.virConnect, uuid: str, target: str, word: str,
          arguments: list[str], words: list[str], params: dict[str, str]) -> None:
    """Carry out one disk word (checked by the node for its shape)."""
    dom = _domain(conn, uuid)
    _element(dom, target, live=True)  # ENOENT for a disk that is not there
    flags = _flags(word, words)
    bandwidth = _bandwidth(params)
    if word == "commit":
        base = arguments[0] if arguments else None
        top = arguments[1] if len(arguments) > 1 else None
        dom.blockCommit(target, base, top, bandwidth, flags)
    elif word == "commit-active":
        base = arguments[0] if arguments else None
        dom.blockCommit(target, base, None, bandwidth,
                        flags | libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
    elif word == "pull":
        base = arguments[0] if arguments else None
        dom.blockRebase(target, base, bandwidth, flags)
    elif word == "copy":
        top = _element(dom, target, live=True)
        driver = top.find("driver")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        dest = etree.Element("disk", type="file")
        etree.SubElement(dest, "source", file=arguments[0])
        etree.SubElement(dest, "driver", type=fmt)
        if dom.isPersistent():
            # libvirt copies a persistent domain's disk only as a job that a restart ends.
            flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        params_ = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth * 1024 * 1024} \
            if bandwidth else {}
        dom.blockCopy(target, etree.tostring(dest, encoding=str), params_, flags)
    elif word == "pivot":
        dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    elif word == "abort":
        dom.blockJobAbort(target, 0)
    elif word == "resize":
        dom.blockResize(target, parse_size(arguments[0]), libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    else:
        raise DriverError(errno.EINVAL, f"unknown disk word {word!r}")


def _device_flags(dom: libvirt.virDomain) -> int:
    """Live and config as the domain's state allows."""
    if not dom.isActive():
        return libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if dom.isPersistent():
        return libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
    return libvirt.VIR_DOMAIN_AFFECT_LIVE


def _checked(data: bytes, target: str) -> str:
    element = xmldocs.parse(data, "disk")
    found = element.find("target")
    dev = found.get("dev") if found is not None else None
    if dev != target:
        raise DriverError(errno.EINVAL, f"the disk element's <target dev=...> must be "
                                        f"{target!r} (the folder's name), not {dev!r}")
    return etree.tostring(element, encoding=str)


# QEMU's refusal of a media change whose tray it has closed (blockdev-remove-medium and
# blockdev-insert-medium say it in two spellings).
_TRAY_NOT_OPEN = re.compile(r"Tray of (the )?device\b.*\bis not open")


def _stale_tray(dom: libvirt.virDomain, target: str, error: libvirt.libvirtError) -> bool:
    """Whether libvirt failed a media change because it believes the tray open while QEMU
    has it closed: a guest that resets its IDE channel (SRST: its firmware as it probes
    the drives, an OS's driver too) makes QEMU close the tray without an event, and
    libvirt, which opens the tray only when it believes it closed, fails every change of
    this drive until the guest is reset or restarted."""
    if not _TRAY_NOT_OPEN.search(error.get_error_message() or ""):
        return False
    try:
        disk = _find(_document(dom, live=True), target) if dom.isActive() else None
    except libvirt.libvirtError:
        return False
    found = disk.find("target") if disk is not None else None
    return found is not None and found.get("tray") == "open"


def update_disk(conn: libvirt.virConnect, uuid: str, target: str, data: bytes) -> None:
    """A new `xml` for an existing disk: updateDeviceFlags (a CD-ROM's media, say)."""
    xml = _checked(data, target)
    dom = _domain(conn, uuid)
    _element(dom, target, live=False)
    try:
        dom.updateDeviceFlags(xml, _device_flags(dom))
    except libvirt.libvirtError as e:
        if not _stale_tray(dom, target, e):
            raise
        raise DriverError(
            errno.EBUSY,
            f"libvirt believes the tray of {target!r} open, but QEMU has it closed: the "
            f"guest reset the drive (its firmware does while it boots, an OS as it probes "
            f"its drives), which closes the tray without telling libvirt; libvirt changes "
            f"no media in this drive until the guest is reset (echo reset > control) or "
            f"restarted.  libvirt said: {e.get_error_message()}",
            e.get_error_code()) from None


def attach_disk(conn: libvirt.virConnect, uuid: str, target: str, data: bytes) -> None:
    """`mkdir disks/vdb` + its `xml`: attachDeviceFlags."""
    xml = _checked(data, target)
    dom = _domain(conn, uuid)
    if target in list_disks(conn, uuid):
        raise DriverError(errno.EEXIST, f"domain {dom.name()!r} has a disk {target!r}")
    dom.attachDeviceFlags(xml, _device_flags(dom))


def detach_disk(conn: libvirt.virConnect, uuid: str, target: str) -> None:
    """rmdir of a disk's folder: detachDeviceFlags, live and config as they have it."""
    dom = _domain(conn, uuid)
    flags = 0
    if dom.isActive() and _find(_document(dom, live=True), target) is not None:
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    if dom.isPersistent() and _find(_document(dom, live=False), target) is not None:
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if not flags:
        raise DriverError(errno.ENOENT, f"domain {dom.name()!r} has no disk {target!r}")
    dom.detachDeviceFlags(render(_element(dom, target, live=True)), flags)


class DiskCalls:
    """The disk coroutines of `Host` (nodes/backend.py says them)."""

    connection: Connection
    block_jobs: BlockJobOutcomes

    async def domain_disks(self, uuid: str) -> list[str]:
        return await self.connection.call(list_disks, uuid, changes=False)

    async def disk_xml(self, uuid: str, target: str, live: bool) -> str:
        return await self.connection.call(disk_xml, uuid, target, live, changes=False)

    async def disk_info(self, uuid: str, target: str) -> Info:
        return await self.connection.call(disk_info, uuid, target, changes=False)

    async def disk_chain(self, uuid: str, target: str) -> list[str]:
        return await self.connection.call(disk_chain, uuid, target, changes=False)

    async def disk_stats(self, uuid: str, target: str) -> Info:
        return await self.connection.call(disk_stats, uuid, target, changes=False)

    async def disk_job(self, uuid: str, target: str) -> Info:
        mark = self.block_jobs.mark()
        job = await self.connection.call(disk_job, uuid, target, changes=False)
        if job:
            self.block_jobs.running(uuid, target, mark)
        return job

    def disk_last_job(self, uuid: str, target: str) -> str | None:
        """How the disk's last block job ended (`copy cancelled`), if an event said so
        since the connection was opened."""
        return self.block_jobs.last(uuid, target)

    async def disk_control(self, uuid: str, target: str, word: str, arguments: list[str],
                           modifiers: list[str], params: dict[str, str], wait: bool) -> None:
        """One disk word; with `wait`, returns once the job it started has ended, or is
        ready to pivot (copy, commit-active)."""
        if word != "wait":
            await self.connection.call(start, uuid, target, word, arguments, modifiers, params,
                                       what=f"disk {target} {word}")
            if not wait or word in ("pivot", "abort", "resize"):
                return
        with trio.move_on_after(MAX_WAIT_SECONDS) as scope:
            while True:
                job = await self.disk_job(uuid, target)
                if not job or job.get("ready"):
                    return
                await trio.sleep(WAIT_POLL_SECONDS)
        if scope.cancelled_caught:
            raise DriverError(errno.ETIMEDOUT, f"the block job on {target} did not end "
                                               f"within {MAX_WAIT_SECONDS:g} s")

    async def update_disk(self, uuid: str, target: str, data: bytes) -> None:
        await self.connection.call(update_disk, uuid, target, data)

    async def attach_disk(self, uuid: str, target: str, data: bytes) -> None:
        await self.connection.call(attach_disk, uuid, target, data)

    async def detach_disk(self, uuid: str, target: str) -> None:
        await self.connection.call(detach_disk, uuid, target)
