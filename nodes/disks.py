"""domains/<name>/disks/: one folder per disk, named by its target (vda, sda, hdc).

A disk's folder shows its element (`xml`, and `live.xml` while the domain runs), `info`,
its backing `chain`, `stats` and the block `job` (the running one, or how the last one
ended); its `control` starts and ends block jobs (docs/disks.md).  `mkdir disks/vdb` and
a disk element written into its `xml` plug a disk in; `rmdir` unplugs one.  Like every
object folder, a disk's is kept from recursive deletes by its Guard: `rm -rf disks`
removes nothing.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, ClassVar

from libvirtfs.nodes.base import Context, Directory, Entry, QueryFile, fs_error
from libvirtfs.nodes.objects import (
    CollectionDirectory,
    ObjectControlFile,
    ObjectDirectory,
    folder,
)
from libvirtfs.nodes.render import key_values
from libvirtfs.nodes.words import (
    DISK_ARGUMENTS,
    DISK_JOB_WORDS,
    DISK_MIRROR_JOBS,
    DISK_WORDS,
)
from libvirtfs.nodes.writable import DefinitionFile

if TYPE_CHECKING:
    from libvirtfs.nodes.backend import Host

# `job` changes while one watches a block job: kept no longer than this.
WATCHED_CACHE_SECONDS = 0.1


def _disk(node: Any) -> DiskDirectory:
    directory = folder(node)
    assert isinstance(directory, DiskDirectory)
    return directory


class DiskLiveXmlFile(QueryFile):
    __slots__ = ()
    private = True  # a part of the domain's live.xml (vfs/permissions.py)

    async def render(self) -> str:
        disk = _disk(self)
        return await disk.host.disk_xml(disk.domain_uuid, disk.key, True)  # type: ignore[arg-type]


class DiskFactsFile(QueryFile):
    """`key: value` lines of what the host's method `facts` says of the disk: `info` and
    `stats` differ only by that method."""

    __slots__ = ()
    facts: ClassVar[str]  # the name of a Host method taking (domain uuid, target)

    async def render(self) -> bytes:
        disk = _disk(self)
        facts = getattr(disk.host, self.facts)
        return key_values(await facts(disk.domain_uuid, disk.key))


class DiskInfoFile(DiskFactsFile):
    __slots__ = ()
    facts = "disk_info"


class ChainFile(QueryFile):
    __slots__ = ()

    async def render(self) -> str:
        disk = _disk(self)
        lines = await disk.host.disk_chain(disk.domain_uuid, disk.key)  # type: ignore[arg-type]
        return "".join(f"{line}\n" for line in lines)


class StatsFile(DiskFactsFile):
    """Kept for cache_timeout like `info`: `watch cat stats` sees it move every second,
    and tar's stat and read agree."""

    __slots__ = ()
    facts = "disk_stats"


class BlockJobFile(QueryFile):
    __slots__ = ()

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, cache_seconds=WATCHED_CACHE_SECONDS)

    async def render(self) -> bytes:
        """The running job; with none, `last: TYPE STATUS` if one ended while we watched."""
        disk = _disk(self)
        job = await disk.host.disk_job(disk.domain_uuid, disk.key)  # type: ignore[arg-type]
        if not job:
            last = disk.host.disk_last_job(disk.domain_uuid, disk.key)  # type: ignore[arg-type]
            if last is not None:
                job = {"last": last}
        return key_values(job)


def usage() -> str:
    words = [" ".join(part for part in (word, arguments, *(f"[{m}]" for m in modifiers))
                      if part)
             for word, (arguments, modifiers) in DISK_WORDS.items()]
    return ("; ".join(words) + "; block jobs also take bandwidth=MIB_PER_S and wait")


class DisksDirectory(CollectionDirectory):
    """disks/: the domain's disks, by target."""

    kind = "disk"
    remembers_missing = False  # a disk plugged in elsewhere shows at the next lookup

    def __init__(self, ctx: Context, host: Host, domain_uuid: str) -> None:
        super().__init__(ctx, host, parent_key=domain_uuid)
        self.domain_uuid = domain_uuid

    async def listing(self) -> list[tuple[str, str]]:
        return [(target, target) for target in await self.host.domain_disks(self.domain_uuid)]

    def make(self, key: str | None) -> ObjectDirectory:
        return DiskDirectory(self.ctx, self.host, key, parent_key=self.domain_uuid)

    @property
    def guard(self) -> Any:
        """The domain folder's: a refused removal in here is one inside the domain."""
        owner = self.parent
        return owner.guard if isinstance(owner, ObjectDirectory) else None

    async def remove(self, name: str, *, directory: bool) -> None:
        if name in self._pending:
            await super().remove(name, directory=directory)
            return
        node = await self._object(name)
        node.guard.check_rmdir(node.path, f"disk {name!r}")
        async with node.lock:
            await self.host.detach_disk(self.domain_uuid, node.key)  # type: ignore[arg-type]
        self._domain_changed()

    async def rename(self, name: str, target: Directory, new_name: str, *,
                     replace: bool = True) -> None:
        raise fs_error(errno.EPERM, "a disk's target names it in libvirt; it cannot be "
                                    "renamed (rmdir and mkdir plug it out and in)")

    def _domain_changed(self) -> None:
        """A disk came, went or changed: the domain's files say so too."""
        owner = self.parent
        if isinstance(owner, ObjectDirectory):
            owner.invalidate_all()
        else:
            self.invalidate()
        self.touch()
        self.ctx.changed(self)


class DiskDirectory(ObjectDirectory):
    """disks/<target>/; `key` is the target (None while pending: made by mkdir, plugged
    in once its `xml` is written)."""

    kind = "disk"
    served_files: ClassVar[dict] = {
        "xml": lambda d: DefinitionFile(d.ctx, d),
        "live.xml": lambda d: DiskLiveXmlFile(d.ctx),
        "info": lambda d: DiskInfoFile(d.ctx),
        "chain": lambda d: ChainFile(d.ctx),
        "stats": lambda d: StatsFile(d.ctx),
        "job": lambda d: BlockJobFile(d.ctx),
        "control": lambda d: ObjectControlFile(d.ctx),
    }
    served_names = frozenset(served_files)
    fixed = False  # live.xml is there only while the domain runs

    __slots__ = ()

    @property
    def domain_uuid(self) -> str:
        return self.parent_key  # type: ignore[return-value]

    async def _running(self) -> bool:
        state, _ = await self.host.domain_state(self.domain_uuid)
        return state not in ("shutoff", "crashed")

    async def scan(self) -> list[Entry]:
        entries = await super().scan()
        if self.key is not None and not await self._running():
            entries = [entry for entry in entries if entry.name != "live.xml"]
        return entries

    # -- xml -----------------------------------------------------------------------------

    async def definition(self) -> bytes:
        if self.key is None:
            return b""
        return (await self.host.disk_xml(self.domain_uuid, self.key, False)).encode()

    async def define(self, data: bytes) -> None:
        async with self.lock:
            if self.key is None:
                await self.host.attach_disk(self.domain_uuid, self.name, data)
                self.key = self.name
                if isinstance(self.parent, CollectionDirectory):
                    self.parent.adopt(self)
            else:
                await self.host.update_disk(self.domain_uuid, self.key, data)
        self._changed()

    def _changed(self) -> None:
        if isinstance(self.parent, DisksDirectory):
            self.parent._domain_changed()
        else:
            self.invalidate_all()

    # -- control -------------------------------------------------------------------------

    async def words(self) -> list[str]:
        """The words valid now: none while the domain is not running; the job words with
        no job; `pivot` (once ready) and `abort` while one runs."""
        if self.key is None or not await self._running():
            return []
        job = await self.host.disk_job(self.domain_uuid, self.key)
        if not job:
            return ["commit", "commit-active", "pull", "copy", "resize"]
        if job.get("type") in DISK_MIRROR_JOBS and job.get("ready"):
            return ["pivot", "abort"]
        return ["abort"]

    async def listed_words(self) -> list[str]:
        return [*await self.words(), "wait"]

    async def control(self, word: str, arguments: list[str]) -> None:
        if word not in DISK_WORDS:
            raise fs_error(errno.EINVAL, f"unknown control word {word!r}; the words are: "
                                         f"{usage()}")
        _, allowed = DISK_WORDS[word]
        positional: list[str] = []
        modifiers: list[str] = []
        params: dict[str, str] = {}
        wait = False
        for argument in arguments:
            if word in DISK_JOB_WORDS and argument == "wait":
                wait = True
            elif word in DISK_JOB_WORDS and argument.startswith("bandwidth="):
                value = argument.partition("=")[2]
                if not value.isdigit():
                    raise fs_error(errno.EINVAL, f"{argument}: the bandwidth is in MiB/s, a "
                                                 f"whole number")
                params["bandwidth"] = value
            elif argument in allowed:
                modifiers.append(argument)
            else:
                positional.append(argument)
        least, most = DISK_ARGUMENTS[word]
        if not least <= len(positional) <= most:
            raise fs_error(errno.EINVAL, f"usage: {word} {DISK_WORDS[word][0]}".rstrip()
                                         + f"; the words are: {usage()}")
        if self.key is None:
            raise fs_error(errno.ENOENT, f"{self.path} is not plugged in yet (write its xml)")
        try:
            await self.host.disk_control(self.domain_uuid, self.key, word, positional,
                                         modifiers, params, wait or word == "wait")
        finally:
            self._changed()
