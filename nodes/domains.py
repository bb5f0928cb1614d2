"""domains/<name>/: one folder per domain, addressed by UUID so renames keep identity."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from libvirtfs.nodes import migration
from libvirtfs.nodes.base import Context, Directory, QueryFile, fs_error
from libvirtfs.nodes.disks import DisksDirectory
from libvirtfs.nodes.guard import FILE_COPIERS, caller
from libvirtfs.nodes.names import name_for_new_object
from libvirtfs.nodes.objects import CollectionDirectory, ObjectDirectory, folder
from libvirtfs.nodes.render import key_values
from libvirtfs.nodes.snapshots import SnapshotsDirectory
from libvirtfs.nodes.words import (
    DOMAIN_JOB_WORDS,
    DOMAIN_STATES,
    DOMAIN_WORDS_BY_STATE,
    JOB_ABORT_WORD,
    MIGRATABLE_STATES,
    MIGRATE_WORD,
    UNDEFINE_FLAGS,
    parse_words,
)

if TYPE_CHECKING:
    from libvirtfs.nodes.backend import Host

UNDEFINE = "user.undefine-flags"
MIGRATE = "user.migrate"
# `job` changes while one watches it: its rendering is kept no longer than this (the stat
# before a read and the read itself still agree).
JOB_CACHE_SECONDS = 0.1


def undefine_words(value: bytes) -> list[str]:
    """user.undefine-flags: a comma-separated list of UNDEFINE_FLAGS, not both nvram and
    keep-nvram; OSError(EINVAL) saying what is wrong."""
    words = parse_words(value, UNDEFINE_FLAGS, "undefine flag")
    if {"nvram", "keep-nvram"} <= set(words):
        raise fs_error(errno.EINVAL, "nvram removes the NVRAM file and keep-nvram keeps it: "
                                     "choose one")
    return words


class DomainsDirectory(CollectionDirectory):
    """domains/; `user.undefine-flags` says what rmdir may discard with a domain, for as
    long as the mount runs."""

    kind = "domain"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.undefine: list[str] = []

    async def listing(self) -> list[tuple[str, str]]:
        return await self.host.list_domains()

    def make(self, key: str | None) -> ObjectDirectory:
        return DomainDirectory(self.ctx, self.host, key)

    def removal_words(self) -> list[str]:
        return list(self.undefine)

    async def xattrs(self) -> dict[str, bytes]:
        mine = {UNDEFINE: ",".join(self.undefine).encode()} if self.undefine else {}
        return {**mine, **await super().xattrs()}

    async def set_xattr(self, name: str, value: bytes) -> None:
        if name != UNDEFINE:
            await super().set_xattr(name, value)
            return
        self.undefine = undefine_words(value)  # an empty value is the default

    async def remove_xattr(self, name: str) -> None:
        if name == UNDEFINE and self.undefine:
            self.undefine = []
            return
        await super().remove_xattr(name)

    async def rename(self, name: str, target: Directory, new_name: str, *,
                     replace: bool = True) -> None:
        if isinstance(target, DomainsDirectory) and target.host is not self.host:
            await self._migrate(name, target, new_name)
            return
        await super().rename(name, target, new_name, replace=replace)

    async def _migrate(self, name: str, target: DomainsDirectory, new_name: str) -> None:
        """`mv hosts/a/domains/VM hosts/b/domains/[NAME]`: migrate with the options of
        user.migrate on the folder; returns once the VM is on b, whose domains/ then shows
        this very folder (its inode moved with it, as the kernel believes)."""
        node = await self._object(name)
        assert isinstance(node, DomainDirectory)
        who = caller()
        if who.command in FILE_COPIERS:
            # Copying programs rename only what they made; a domain folder moved by one is
            # not a migration anybody asked for.
            raise fs_error(errno.EPERM, f"{node.path}: {who.command} does not migrate "
                                        f"domains; mv does (docs/hosts.md)")
        if node.key is None:
            raise fs_error(errno.EPERM, f"{node.path} is not defined yet; only a defined "
                                        f"domain can move to another host")
        dest_name = name_for_new_object(new_name, target.reserved)
        if new_name in await target.children(refresh=True):
            raise fs_error(errno.EEXIST, f"{target.path}/{new_name} exists; libvirtfs never "
                                         f"replaces a domain by migrating another")
        options = node.migrate_options
        if dest_name != node.libvirt_name:
            options = options.with_param("dest-name", dest_name)
        if "live" in options.flags and await node.state(fresh=True) == "shutoff":
            # A shut-off domain has nothing to move live: its definition moves.
            options = options.with_flag("offline", instead_of="live")
        # The domain leaves host a before the migration returns; listings of a in that
        # time (its events) must not make this folder vanish.
        node.moving = True
        try:
            await node.migrate(target.host, options, target,
                               " ".join(["mv to", target.path, *options.words()]))
        finally:
            node.moving = False
        key = node.key
        self._by_name.pop(name, None)
        self._by_key.pop(key, None)
        self.invalidate()
        self.touch()
        self.ctx.changed(self)
        node.rehost(target.host)
        node.ctx = target.ctx  # a host's part of the tree may have its own (read-only)
        node.parent, node.name = target, new_name
        target.take(key, node)


class LiveXmlFile(QueryFile):
    __slots__ = ()
    private = True  # the running definition: as secret as `xml`

    async def render(self) -> str:
        directory = folder(self)
        return await directory.host.domain_live_xml(directory.key)  # type: ignore[arg-type]


class JobFile(QueryFile):
    __slots__ = ()

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, cache_seconds=JOB_CACHE_SECONDS)

    async def render(self) -> bytes:
        directory = folder(self)
        return key_values(await directory.host.domain_job(directory.key))  # type: ignore[arg-type]


def _snapshots(directory: ObjectDirectory) -> SnapshotsDirectory:
    return SnapshotsDirectory(directory.ctx, directory.host, directory.key)  # type: ignore[arg-type]


def _disks(directory: ObjectDirectory) -> DisksDirectory:
    return DisksDirectory(directory.ctx, directory.host, directory.key)  # type: ignore[arg-type]


class DomainDirectory(ObjectDirectory):
    kind = "domain"
    states = DOMAIN_STATES
    more_words = ["migrate DEST [OPTIONS]"]
    served_files = {
        **ObjectDirectory.served_files,
        "live.xml": lambda d: LiveXmlFile(d.ctx),
        "job": lambda d: JobFile(d.ctx),
        # Keyed by the domain (per_object): a domain defined anew has new snapshots.
        "snapshots": _snapshots,
        "disks": _disks,
    }
    served_names = frozenset(served_files)

    __slots__ = ("migrate_setting",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.migrate_setting: migration.MigrateOptions | None = None  # user.migrate

    @property
    def migrate_options(self) -> migration.MigrateOptions:
        """What `mv` to another host uses: user.migrate, or the default."""
        return self.migrate_setting or migration.DEFAULT

    async def xattrs(self) -> dict[str, bytes]:
        mine = ({MIGRATE: " ".join(self.migrate_setting.words()).encode()}
                if self.migrate_setting else {})
        return {**mine, **await super().xattrs()}

    async def set_xattr(self, name: str, value: bytes) -> None:
        if name != MIGRATE:
            await super().set_xattr(name, value)
            return
        options = migration.parse_attribute(value)
        self.migrate_setting = None if options == migration.DEFAULT else options

    async def remove_xattr(self, name: str) -> None:
        if name == MIGRATE and self.migrate_setting:
            self.migrate_setting = None
            return
        await super().remove_xattr(name)

    async def control(self, word: str, arguments: list[str]) -> None:
        if word != MIGRATE_WORD:
            await super().control(word, arguments)
            return
        if not arguments:
            raise fs_error(errno.EINVAL, f"usage: migrate DEST [OPTIONS]: DEST is a host "
                                         f"folder under hosts/ or a libvirt URI; the options "
                                         f"are: {migration.option_words()}")
        options = migration.parse_options(arguments[1:])
        destination, target = await self._destination(arguments[0])
        await self.migrate(destination, options, target,
                           " ".join([MIGRATE_WORD, arguments[0], *options.words()]))

    async def _destination(self, text: str) -> tuple[Host | str, Directory | None]:
        """DEST: a host folder of this mount (its host and its domains/), or a URI (a
        mounted host's own URI means that host)."""
        from libvirtfs.nodes.hosts import HostDirectory, HostsDirectory  # they import us

        node = self.parent
        while node is not None and not isinstance(node, HostsDirectory):
            node = node.parent
        hosts = await node.children() if node is not None else {}
        found = hosts.get(text)
        if found is None and ":" in text:
            for candidate in hosts.values():
                if isinstance(candidate, HostDirectory) and candidate.host is not None:
                    try:
                        if await candidate.host.uri() == text:
                            found = candidate
                            break
                    except OSError:
                        continue
        if isinstance(found, HostDirectory):
            if found.host is None:
                raise fs_error(errno.ENOTCONN, f"migrate: host {text!r} has no URI yet "
                                               f"(echo URI > {found.path}/uri)")
            if found.ctx.read_only:
                raise fs_error(errno.EROFS, f"migrate: {found.path}: "
                                            f"{found.ctx.read_only_reason}")
            domains = (await found.children()).get("domains")
            return found.host, domains if isinstance(domains, Directory) else None
        if ":" not in text:
            raise fs_error(errno.EINVAL, f"migrate: no host {text!r} in this mount "
                                         f"(hosts: {', '.join(hosts) or 'none'}), and it is "
                                         f"not a libvirt URI")
        return text, None

    async def migrate(self, destination: Host | str, options: migration.MigrateOptions,
                      target: Directory | None, what: str = "migrate") -> None:
        """Migrate now; returns when libvirt has finished, or raises its error (the VM is
        then still here)."""
        if destination is self.host:
            raise fs_error(errno.EINVAL, f"{self.path} is on that host already")
        async with self.lock:
            if self.key is None:
                raise fs_error(errno.ENOENT, f"{self.path} is not defined yet")
            state = await self.state(fresh=True)
            if state not in MIGRATABLE_STATES:
                raise fs_error(errno.EBUSY, f"a {state} domain cannot be migrated")
        # A job, outside the lock as the other jobs: `abort` and the other words reach
        # libvirt meanwhile (a second job is EBUSY).
        try:
            await self.host.migrate(self.key, destination,  # type: ignore[arg-type]
                                    list(options.flags),
                                    dict(options.params), what=what)
        finally:
            self.invalidate_all()
        for collection in (self.parent, target):
            if collection is not None:
                collection.invalidate()
                self.ctx.changed(collection)

    async def state(self, *, fresh: bool = False) -> str:
        """`fresh`: asked of libvirt now, not of the host's table (an event may still be
        on its way), for checks that decide what to do."""
        return (await self.host.domain_state(self.key, fresh=fresh))[0]  # type: ignore[arg-type]

    async def info(self) -> dict[str, Any]:
        return await self.host.domain_info(self.key)  # type: ignore[arg-type]

    def state_now(self) -> str | None:
        if self.key is None:
            return None
        states = self.host.domain_state_now(self.key)
        return None if states is None else states[0]

    def info_now(self) -> dict[str, Any] | None:
        return None if self.key is None else self.host.domain_info_now(self.key)

    async def words(self) -> list[str]:
        """The words of the state; then `abort` while a job runs, or else `migrate` where
        it can be done (listed bare, as `wait` is: written bare, it is refused with its
        usage, so a saved `control` written back still carries out nothing)."""
        state = await self.state()
        words = DOMAIN_WORDS_BY_STATE.get(state, [])
        if self.host.job_running(self.key):  # type: ignore[arg-type]
            return [*words, JOB_ABORT_WORD]
        if state in MIGRATABLE_STATES and await self.host.migrates():
            return [*words, MIGRATE_WORD]
        return words

    async def carry_out(self, word: str) -> None:
        """Jobs run outside the domain's lock: `abort`, reads and the other domains'
        files go on meanwhile (a second job is refused by the job runner, EBUSY)."""
        if word == JOB_ABORT_WORD:
            await self.host.control(self.kind, self.key, word)  # type: ignore[arg-type]
            self.invalidate_all()
            return
        if word not in DOMAIN_JOB_WORDS:
            await super().carry_out(word)
            return
        async with self.lock:
            await self.check_word(word)
        try:
            await self.host.control(self.kind, self.key, word)  # type: ignore[arg-type]
        finally:
            self.invalidate_all()

    async def check_word(self, word: str) -> None:
        # Checked here so that every hypervisor refuses alike (the test driver calls a
        # wrong state an internal error).
        # The state of now, not of the host's table: an event may be on its way.
        state = await self.state(fresh=True)
        valid = DOMAIN_WORDS_BY_STATE.get(state, [])
        if word not in valid:
            raise fs_error(errno.EBUSY, f"{word} is not possible while the domain is "
                                        f"{state}; valid now: {', '.join([*valid, 'wait'])}")
