"""libvirt's event loop in a daemon thread, and the hand-over of events to trio.

libvirt delivers events (and keepalives) only while somebody runs its event loop; the
default implementation must be registered before any connection is opened.  Callbacks run
on that thread, so they are handed to trio with `TrioToken.run_sync_soon`, which never
blocks: a blocking hand-over would stall libvirt's own loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import libvirt
import trio

from libvirtfs.drivers import counting, eventwords

log = logging.getLogger(__name__)

_started = False
_start_lock = threading.Lock()


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation once and run it forever."""
    global _started
    with _start_lock:
        if _started:
            return
        # libvirt prints every error to stderr unless told otherwise; ours are reported
        # through DriverError instead.
        libvirt.registerErrorHandler(lambda ctx, error: None, None)
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_forever, name="libvirt-events", daemon=True)
        thread.start()
        _started = True


def _run_forever() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # the loop must survive a bad callback
            log.exception("libvirt event loop")


# Lifecycle events after which every domain is still there under its name (a started or
# stopped domain may be transient, one defined or undefined comes or goes): no need to
# list the domains again for them.
_SAME_LISTING = frozenset(getattr(libvirt, name) for name in (
    "VIR_DOMAIN_EVENT_SUSPENDED", "VIR_DOMAIN_EVENT_RESUMED", "VIR_DOMAIN_EVENT_SHUTDOWN",
    "VIR_DOMAIN_EVENT_PMSUSPENDED", "VIR_DOMAIN_EVENT_CRASHED") if hasattr(libvirt, name))


@dataclass(frozen=True)
class Change:
    """Something changed on a host: `kind` is domain, snapshot, pool, volume or network
    (or host: anything may have changed); `uuid` names the object (the domain for a
    snapshot) when known; `listing`: objects may have come or gone (or been renamed)."""

    kind: str
    uuid: str | None = None
    detail: str = ""
    listing: bool = True


# publish(kind, name, event, detail, when): one line of hosts/<host>/events (nodes/stream.py)
Publish = Callable[[str, str, str, str, float], None]


class BlockJobWatcher(Protocol):
    """What keeps how each disk's last block job ended (drivers/blockjobs.py)."""

    def ended(self, uuid: str, target: str, kind: int, status: int) -> None: ...


class Watcher(Protocol):
    """What keeps tables true by events (drivers/tables.py HostTables)."""

    def changed(self, change: Change) -> None: ...
    def watching(self, kinds: frozenset[str]) -> None: ...


class EventForwarder:
    """Registers libvirt event callbacks on a connection and forwards them as `Change`s to a
    trio-side callback, and as event lines to `publish` (words: drivers/eventwords.py).
    `tables` hears of each change at once, on libvirt's thread (before the tree does), and
    which kinds have their lifecycle events registered; `block_jobs`, how each block
    job ended, before the tree reads `job` afresh."""

    def __init__(self, token: trio.lowlevel.TrioToken, deliver: Callable[[Change], None],
                 publish: Publish | None = None, tables: Watcher | None = None,
                 block_jobs: BlockJobWatcher | None = None) -> None:
        self._token = token
        self._deliver = deliver
        self._publish = publish
        self._tables = tables
        self._block_jobs = block_jobs
        # Per connection: how to undo each registration made on it.
        self._registered: dict[libvirt.virConnect, list[tuple[Callable[[int], None], int]]] = {}
        self._opened_before = False

    def _send(self, change: Change) -> None:
        if self._tables is not None:
            self._tables.changed(change)
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._deliver, change)

    def _line(self, kind: str, name: str, event: str, detail: str = "") -> None:
        """One event line, stamped now (on libvirt's thread, when the event came)."""
        if self._publish is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._publish, kind, name, event, detail, time.time())

    def register(self, conn: libvirt.virConnect) -> None:
        """Called in a worker thread each time the connection opens.  Events missed while
        the connection was down are lost, so a reopen also says: everything may have
        changed.  The first open does not: nothing was read before it, and saying so would
        throw away the listings made as the host is attached, and list everything again."""
        conn = counting.unwrap(conn)  # deregister() is handed the connection itself
        if conn in self._registered:
            return  # on_open and the first call may both hand over the same connection
        if self._opened_before:
            self._send(Change("host", detail="connected"))
        self._opened_before = True
        self._line("host", "", "connected")
        domain = (conn.domainEventRegisterAny, conn.domainEventDeregisterAny)
        network = (conn.networkEventRegisterAny, conn.networkEventDeregisterAny)
        pool = (conn.storagePoolEventRegisterAny, conn.storagePoolEventDeregisterAny)
        registrations = [
            (domain, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._domain),
            (domain, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._domain_plain),
            (domain, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._job_completed),
            (domain, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._block_job),
            (network, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE, self._network),
            (pool, libvirt.VIR_STORAGE_POOL_EVENT_ID_LIFECYCLE, self._pool),
        ]
        if hasattr(libvirt, "VIR_DOMAIN_EVENT_ID_METADATA_CHANGE"):
            registrations.append((domain, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
                                  self._domain_metadata))
        if hasattr(libvirt, "VIR_STORAGE_POOL_EVENT_ID_REFRESH"):
            registrations.append((pool, libvirt.VIR_STORAGE_POOL_EVENT_ID_REFRESH,
                                  self._pool_plain))
        made = self._registered.setdefault(conn, [])
        kept: set[str] = set()
        lifecycle = {id(domain): "domain", id(network): "network", id(pool): "pool"}
        for methods, event_id, callback in registrations:
            register, deregister = methods
            try:
                made.append((deregister, register(None, event_id, callback, None)))
            except libvirt.libvirtError as e:
                log.info("events not available (%s)", e.get_error_message())
                continue
            if callback in (self._domain, self._network, self._pool):
                kept.add(lifecycle[id(methods)])
        if self._tables is not None:
            self._tables.watching(frozenset(kept))

    def deregister(self, conn: libvirt.virConnect) -> None:
        """Called before `conn` is closed: a callback still registered keeps the
        connection, and libvirtd's client, alive."""
        for deregister, callback_id in self._registered.pop(conn, []):
            # On a dead connection the RPC fails, but the client library has dropped
            # its own reference by then, which is what matters.
            with contextlib.suppress(libvirt.libvirtError):
                deregister(callback_id)

    def lost(self, reason: str) -> None:
        """The connection was lost (Connection.on_lost): `host NAME disconnected REASON`."""
        self._line("host", "", "disconnected", reason)

    def late(self, what: str) -> None:
        """An abandoned call finished after all: anything may have changed."""
        self._send(Change("host", detail=f"late outcome of {what}"))

    # Callbacks, on libvirt's event thread.  An object's name() is kept in the object
    # libvirt hands over: asking it costs no call to the daemon.

    def _domain(self, conn, dom, event, detail, opaque) -> None:
        self._send(Change("domain", dom.UUIDString(), f"{event}:{detail}",
                          listing=event not in _SAME_LISTING))
        self._line("domain", dom.name(), *eventwords.domain_lifecycle(event, detail))

    def _domain_plain(self, conn, dom, opaque) -> None:
        self._send(Change("domain", dom.UUIDString(), "reboot", listing=False))
        self._line("domain", dom.name(), "rebooted")

    def _domain_metadata(self, conn, dom, kind, nsuri, opaque) -> None:
        self._send(Change("domain", dom.UUIDString(), "metadata", listing=False))
        self._line("domain", dom.name(), "metadata-changed", eventwords.metadata_type(kind))

    def _job_completed(self, conn, dom, params, opaque) -> None:
        self._send(Change("domain", dom.UUIDString(), "job", listing=False))
        operation = params.get(getattr(libvirt, "VIR_DOMAIN_JOB_OPERATION", "operation"), 0)
        self._line("domain", dom.name(), "job-completed", eventwords.job_operation(operation))

    def _block_job(self, conn, dom, disk, kind, status, opaque) -> None:
        if self._block_jobs is not None:  # BLOCK_JOB_2 names the disk by its target
            self._block_jobs.ended(dom.UUIDString(), disk, kind, status)
        self._send(Change("domain", dom.UUIDString(), "block job", listing=False))
        event, job = eventwords.block_job(status, kind)
        self._line("domain", dom.name(), event, f"{job}:{disk}")

    def _network(self, conn, net, event, detail, opaque) -> None:
        self._send(Change("network", net.UUIDString(), f"{event}:{detail}"))
        self._line("network", net.name(), eventwords.network_lifecycle(event))

    def _pool(self, conn, pool, event, detail, opaque) -> None:
        self._send(Change("pool", pool.UUIDString(), f"{event}:{detail}"))
        self._line("pool", pool.name(), eventwords.pool_lifecycle(event))

    def _pool_plain(self, conn, pool, opaque) -> None:
        self._send(Change("pool", pool.UUIDString(), "refresh"))
        self._line("pool", pool.name(), "refreshed")
