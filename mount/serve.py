"""Bringing a mount up, serving it, and taking it down cleanly.

Order matters: connect to every host first (a bad URI must fail before anything is
mounted), then mount, attach the hosts (events, reconnecting: the same path a host added
by `mkdir` + `uri` takes), then report readiness, then serve until unmounted or signalled
(SIGHUP reads `--config` again instead: mount/reload.py).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import re
import signal
from collections.abc import Callable

import pyfuse3
import trio

from libvirtfs.drivers.connection import Connection
from libvirtfs.drivers.events import Change, EventForwarder
from libvirtfs.drivers.host import Host
from libvirtfs.mount import systemd
from libvirtfs.mount.config import (
    Config,
    ConfigError,
    HostSpec,
    check_name,
    check_unique,
    parse_host,
    short_name,
)
from libvirtfs.mount.options import MountOptions
from libvirtfs.mount.reload import ConfigReloader
from libvirtfs.nodes.base import Context
from libvirtfs.nodes.hosts import HostDirectory, HostsDirectory, RootDirectory
from libvirtfs.vfs.operations import MAX_FUSE_TASKS, Operations

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 5.0
UNMOUNT_POLL_SECONDS = 0.5


__all__ = ["HostSpec", "StartupError", "parse_host", "serve"]


class StartupError(Exception):
    """Why the mount could not be brought up; one line for the user."""


def host_settings(spec: HostSpec, options: MountOptions) -> tuple[float, bool]:
    """A host's timeout and read-only: its own where given, else the mount's (a read-only
    mount stays read-only throughout)."""
    timeout = spec.timeout if spec.timeout is not None else options.timeout
    read_only = options.read_only or bool(spec.read_only)
    return timeout, read_only


async def open_host(spec: HostSpec, options: MountOptions) -> Host:
    """A Host whose connection is open now; OSError with libvirt's message if not."""
    timeout, read_only = host_settings(spec, options)
    connection = Connection(spec.uri, timeout=timeout, read_only=read_only,
                            keepalive=spec.keepalive, credentials_file=spec.credentials)
    host = Host(connection, job_stall=options.job_stall, cache_timeout=options.cache_timeout)
    try:
        await host.open()
    except BaseException:
        with trio.CancelScope(shield=True):
            await connection.close()  # an open that finishes late is closed, not kept
        raise
    return host


async def connect_hosts(specs: list[HostSpec], options: MountOptions
                        ) -> list[tuple[str, Host, bool]]:
    """Connect every host before anything is mounted (a bad URI fails the mount); name
    those the user did not, around the names the user gave."""
    try:
        check_unique(specs)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    given = {spec.name for spec in specs if spec.name}
    hosts: list[tuple[str, Host, bool]] = []
    taken: set[str] = set()
    for spec in specs:
        try:
            host = await open_host(spec, options)
            name = spec.name or short_name(await host.hostname(), await host.driver_type())
        except OSError as e:
            for _, opened, _ in hosts:
                await opened.connection.close()
            named = f" (hosts/{spec.name})" if spec.name else ""
            raise StartupError(f"cannot connect to {spec.uri or 'the default URI'}{named}: "
                               f"{e.strerror or e}") from None
        try:
            check_name(name, spec.origin)
        except ConfigError as e:
            raise StartupError(str(e)) from None
        if not spec.name:
            unique, n = name, 2
            while unique in taken or unique in given:
                unique, n = f"{name}-{n}", n + 1
            name = unique
        taken.add(name)
        hosts.append((name, host, host_settings(spec, options)[1]))
    return hosts


def admin_gid(group: str | None) -> int | None:
    """The number of `-o admin_group=`: a group name, or a number as it is."""
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"admin group {group!r} does not exist "
                           f"(-o admin_group= takes a group name or number)") from None


def check_mountpoint(path: str) -> None:
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOTCONN:  # a FUSE mount whose process died (kill -9, a crash)
            raise StartupError(f"mount point {path} is a mount whose filesystem process is "
                               f"gone ({e.strerror}): fusermount3 -uz {path}, then mount "
                               f"again") from None
    if not os.path.exists(path):
        raise StartupError(f"mount point {path} does not exist")
    if not os.path.isdir(path):
        raise StartupError(f"mount point {path} is not a folder")
    if os.path.ismount(path):
        raise StartupError(f"mount point {path} is busy: something is mounted there already")


class Mount:
    """The tree, the FUSE operations, and each host's life while mounted: the hosts given
    at startup and those connected by `mkdir` + `uri` are attached the same way
    (`HostLifecycle`, nodes/hosts.py), and detached by rmdir or at unmount."""

    def __init__(self, options: MountOptions) -> None:
        self.options = options
        self.ctx = Context(cache_timeout=options.cache_timeout, read_only=options.read_only,
                           uid=os.getuid() if options.uid is None else options.uid,
                           gid=os.getgid() if options.gid is None else options.gid,
                           admin_gid=admin_gid(options.admin_group))
        self.root = RootDirectory(self.ctx, lifecycle=self)
        self.detached = False  # unmounted lazily (fusermount3 -u -z) while serving
        self.operations = Operations(self.root, self.ctx)  # tells the kernel what changed
        self._send, self._changes = trio.open_memory_channel[tuple[HostDirectory, Change]](1000)
        self._nursery: trio.Nursery | None = None
        # Each attached host's background tasks, cancelled when it is detached.
        self._tending: dict[HostDirectory, trio.CancelScope] = {}

    @property
    def hosts_directory(self) -> HostsDirectory:
        return self.root.hosts_directory

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Apply libvirt's events to the tree (which tells the kernel what to forget and
        lists again what they touched, in tasks of their own); the hosts' background
        tasks live here too."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            async for directory, change in self._changes:
                directory.apply(change)

    async def add_hosts(self, hosts: list[tuple[str, Host, bool]]) -> None:
        for name, host, read_only in hosts:
            try:
                await self.hosts_directory.add(name, host, read_only)
            except OSError as e:
                raise StartupError(f"cannot watch host {name}: {e.strerror or e}") from None

    # -- HostLifecycle -----------------------------------------------------------------

    async def connect(self, name: str, uri: str) -> tuple[Host, bool]:
        return await self.connect_spec(HostSpec(name, uri))

    async def connect_spec(self, spec: HostSpec) -> tuple[Host, bool]:
        """A connected host as `spec` says (`uri` written, a config file reloaded)."""
        host = await open_host(spec, self.options)
        return host, host_settings(spec, self.options)[1]

    async def attach(self, directory: HostDirectory) -> None:
        host = directory.host
        assert host is not None and self._nursery is not None
        forwarder = EventForwarder(trio.lowlevel.current_trio_token(),
                                   self._deliver_to(directory), directory.events.publish,
                                   tables=getattr(host, "tables", None),
                                   block_jobs=getattr(host, "block_jobs", None))
        host.connection.on_open(forwarder.register, forwarder.deregister)
        host.connection.on_late(forwarder.late)
        host.connection.on_lost(forwarder.lost)
        await host.connection.call(forwarder.register)  # already open: register now
        scope = self._tending[directory] = trio.CancelScope()
        self._nursery.start_soon(self._tend, directory, scope)
        log.info("host %s attached (%s)", directory.name, host.connection.where)

    async def detach(self, directory: HostDirectory) -> None:
        scope = self._tending.pop(directory, None)
        if scope is not None:
            scope.cancel()
        if directory.host is not None:
            # Closing runs the forwarder's deregister: libvirtd stops sending its events.
            await directory.host.connection.close()
            log.info("host %s detached (%s)", directory.name, directory.host.connection.where)

    async def detach_all(self) -> None:
        for directory in list(self._tending):
            await self.detach(directory)

    # -- one host's background tasks ---------------------------------------------------

    async def _tend(self, directory: HostDirectory, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(directory.keep_listed)
                nursery.start_soon(self.keep_connected, directory.host)

    def _deliver_to(self, directory: HostDirectory) -> Callable[[Change], None]:
        def deliver(change: Change) -> None:
            try:
                self._send.send_nowait((directory, change))
            except trio.WouldBlock:
                log.warning("event queue full; dropping %s", change)
        return deliver

    async def keep_connected(self, host: Host) -> None:
        """Reconnect a lost host in the background: with events, nothing else would ask
        libvirt anything while renderings are cached, and the tree would stay stale."""
        while True:
            await trio.sleep(RECONNECT_SECONDS)
            if not host.connection.connected:
                with contextlib.suppress(OSError):
                    await host.open()


def _stop(operations: Operations) -> None:
    """End every request in progress (each caller gets ECANCELED: a `wait` must not keep
    the process, or its caller, for up to an hour), then the FUSE main loop."""
    ended = operations.pending.end_all()
    if ended:
        log.info("ended %d request(s) in progress", ended)
    pyfuse3.terminate()


async def _on_signals(operations: Operations, reloader: ConfigReloader | None,
                      nursery: trio.Nursery) -> None:
    """SIGINT and SIGTERM unmount; SIGHUP reloads `--config` (in a task of its own, so
    that a host slow to connect does not hold up a SIGTERM)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if reloader is None:
                    log.info("received SIGHUP: nothing to reload (mounted without --config)")
                else:
                    nursery.start_soon(_reload, reloader)
                continue
            log.info("received %s, unmounting", signal.Signals(signum).name)
            systemd.notify("STOPPING=1")
            _stop(operations)
            return


async def _reload(reloader: ConfigReloader) -> None:
    systemd.notify("RELOADING=1")
    try:
        await reloader.reload()
    finally:
        systemd.notify("READY=1")


def _mount_id(mountpoint: str) -> str | None:
    """Our mount's id in /proc/self/mountinfo (the last mount at `mountpoint`)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if path == mountpoint:
                found = fields[0]
    return found


async def _stop_when_detached(mountpoint: str, mount: Mount) -> None:
    """`fusermount3 -u -z` (or `umount -l`) detaches the mount at once, but the kernel
    keeps talking to us while a file is open, and a writer inside a `wait` keeps its file
    open: notice the detach, and end the requests."""
    mount_id = _mount_id(mountpoint)
    if mount_id is None:
        return
    while True:
        await trio.sleep(UNMOUNT_POLL_SECONDS)
        with open("/proc/self/mountinfo") as f:
            if any(line.split(maxsplit=1)[0] == mount_id for line in f):
                continue
        log.info("%s was unmounted", mountpoint)
        mount.detached = True
        _stop(mount.operations)
        return


async def serve(specs: list[HostSpec], mountpoint: str, options: MountOptions,
                ready: Callable[[], None], config: tuple[str, Config] | None = None) -> None:
    """`config` is `--config`'s path and what it held, for SIGHUP; its hosts are among
    `specs` (after those of the command line)."""
    check_mountpoint(mountpoint)
    admin_gid(options.admin_group)  # an unknown group fails before anything connects
    hosts = await connect_hosts(specs, options)
    mount = Mount(options)
    reloader = None
    if config is not None:
        path, loaded = config
        reloader = ConfigReloader(path, loaded, mount)
    try:
        pyfuse3.init(mount.operations, mountpoint, options.fuse)
    except RuntimeError as e:
        for _, host, _ in hosts:
            await host.connection.close()
        raise StartupError(f"cannot mount at {mountpoint}: {e}") from None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(mount.run)
            await mount.add_hosts(hosts)
            if reloader is not None:
                shown = mount.hosts_directory.host_directories()
                count = len(config[1].hosts) if config is not None else 0
                reloader.started(specs[len(specs) - count:],
                                 [shown[name] for name, _, _ in hosts[len(hosts) - count:]])
            nursery.start_soon(_on_signals, mount.operations, reloader, nursery)
            nursery.start_soon(_stop_when_detached, mountpoint, mount)
            nursery.start_soon(mount.operations.kernel_cache.run)
            ready()
            systemd.notify("READY=1")
            log.info("mounted %s at %s", ", ".join(name for name, _, _ in hosts), mountpoint)
            await pyfuse3.main(max_tasks=MAX_FUSE_TASKS)
            log.debug("FUSE main loop ended")
            nursery.cancel_scope.cancel()
    finally:
        # After `fusermount3 -u` this unmount is a harmless no-op; after a signal it is
        # what takes the mount down.  (Never stat the mount point here: nobody answers.)
        pyfuse3.close(unmount=not mount.detached)
        with trio.CancelScope(shield=True):
            for _, host, _ in hosts:  # also those whose attach failed
                await host.connection.close()
            await mount.detach_all()
        log.info("unmounted %s", mountpoint)
