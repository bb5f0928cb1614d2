"""Bringing a mount up, serving it, and taking it down cleanly.

Order matters: connect to every host first (a bad URI must fail before anything is
mounted), then mount, then report readiness, then serve until unmounted or signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from libvirtfs.drivers.connection import Connection
from libvirtfs.drivers.events import Change, EventForwarder
from libvirtfs.drivers.host import Host
from libvirtfs.mount.options import MountOptions
from libvirtfs.nodes.base import Context
from libvirtfs.nodes.hosts import HostDirectory, RootDirectory
from libvirtfs.vfs.operations import Operations

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 5.0
UNMOUNT_POLL_SECONDS = 0.5


class StartupError(Exception):
    """Why the mount could not be brought up; one line for the user."""


@dataclass
class HostSpec:
    name: str | None
    uri: str | None


def parse_host(text: str) -> HostSpec:
    """`NAME=URI` or `URI`: a URI has its `:` before any `=` (qemu:///system?x=y), a NAME
    has none."""
    name, sep, uri = text.partition("=")
    if sep and ":" not in name:
        return HostSpec(name, uri or None)
    return HostSpec(None, text or None)


def _short_name(hostname: str, driver: str) -> str:
    if driver.lower() == "test":
        return "test"
    return hostname.split(".")[0] or "host"


async def connect_hosts(specs: list[HostSpec], options: MountOptions) -> dict[str, Host]:
    hosts: dict[str, Host] = {}
    for spec in specs:
        connection = Connection(spec.uri, timeout=options.timeout, read_only=options.read_only)
        host = Host(connection)
        try:
            await host.open()
            name = spec.name or _short_name(await host.hostname(), await host.driver_type())
        except OSError as e:
            raise StartupError(f"cannot connect to {spec.uri or 'the default URI'}: "
                               f"{e.strerror or e}") from None
        if not name or "/" in name or name in (".", ".."):
            raise StartupError(f"host name {name!r} cannot be a folder name")
        unique, n = name, 2
        while unique in hosts:
            unique, n = f"{name}-{n}", n + 1
        hosts[unique] = host
    return hosts


def check_mountpoint(path: str) -> None:
    if not os.path.exists(path):
        raise StartupError(f"mount point {path} does not exist")
    if not os.path.isdir(path):
        raise StartupError(f"mount point {path} is not a folder")
    if os.path.ismount(path):
        raise StartupError(f"mount point {path} is busy: something is mounted there already")


class Mount:
    """The tree, the FUSE operations and the event plumbing of one mount."""

    def __init__(self, hosts: dict[str, Host], options: MountOptions) -> None:
        self.hosts = hosts
        self.ctx = Context(cache_timeout=options.cache_timeout, read_only=options.read_only,
                           uid=os.getuid(), gid=os.getgid())
        self.root = RootDirectory(self.ctx, hosts)
        self.detached = False  # unmounted lazily (fusermount3 -u -z) while serving
        self.operations = Operations(self.root, self.ctx)  # tells the kernel what changed
        self._send, self._changes = trio.open_memory_channel[tuple[HostDirectory, Change]](1000)

    async def host_directories(self) -> dict[str, HostDirectory]:
        children = await self.root.hosts_directory.children()
        return {name: node for name, node in children.items()
                if isinstance(node, HostDirectory)}

    async def watch_events(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
        """Apply libvirt's events to the tree (which tells the kernel what to forget and
        lists again what they touched, in tasks of their own)."""
        token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            for directory in (await self.host_directories()).values():
                forwarder = EventForwarder(token, self._deliver_to(directory))
                directory.host.connection.on_open(forwarder.register, forwarder.deregister)
                directory.host.connection.on_late(forwarder.late)
                # Already open: register on the live connection now.
                await directory.host.connection.call(forwarder.register)
                nursery.start_soon(directory.keep_listed)
            task_status.started()
            async for directory, change in self._changes:
                directory.apply(change)

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


async def _stop_on_signals(operations: Operations) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            _stop(operations)
            return


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
                ready: Callable[[], None]) -> None:
    check_mountpoint(mountpoint)
    hosts = await connect_hosts(specs, options)
    mount = Mount(hosts, options)
    try:
        pyfuse3.init(mount.operations, mountpoint, options.fuse)
    except RuntimeError as e:
        raise StartupError(f"cannot mount at {mountpoint}: {e}") from None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(mount.watch_events)
            nursery.start_soon(_stop_on_signals, mount.operations)
            nursery.start_soon(_stop_when_detached, mountpoint, mount)
            nursery.start_soon(mount.operations.kernel_cache.run)
            for host in hosts.values():
                nursery.start_soon(mount.keep_connected, host)
            ready()
            log.info("mounted %s at %s", ", ".join(hosts), mountpoint)
            await pyfuse3.main()
            log.debug("FUSE main loop ended")
            nursery.cancel_scope.cancel()
    finally:
        # After `fusermount3 -u` this unmount is a harmless no-op; after a signal it is
        # what takes the mount down.  (Never stat the mount point here: nobody answers.)
        pyfuse3.close(unmount=not mount.detached)
        for host in hosts.values():
            await host.connection.close()
        log.info("unmounted %s", mountpoint)
