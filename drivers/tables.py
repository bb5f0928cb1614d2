"""A host's tables: every domain, pool and network with its state, from batched calls.

Reading `state` or `info` of one object used to cost a worker-thread hop and a few libvirt
calls, and listing a collection one more; a pass over a thousand domains made thousands.
A table holds what one hop of batched calls says about every object of a kind, and is
answered from without a hop while it holds:

- **Event-kept** (the listing, and each object's state): valid until something says it may
  have changed: one of libvirt's events for that kind, a reconnect, a late outcome of an
  abandoned call, or a call of this mount that changes something (Connection.on_change).
  While the host has no event registration for the kind (registration failed, or the
  connection is down) it is kept `cache_timeout` seconds instead.
- **Refreshed** (a domain's vcpus, memory, cpu time, persistent, autostart, managed save:
  values no event keeps true): kept `cache_timeout` seconds, then fetched again for all
  domains at once by the next reader that needs them.

A fetch that a change overtook (the generation moved while it ran) is handed to its
caller but not kept, as nodes/base.py does for renderings.  Concurrent readers wait for
one fetch (one lock per table), and those that asked before it began take its rows, kept
or not: with events landing during most fetches, each reader fetching in turn made a
pass O(N) fetches.  With `cache_timeout` 0 there are no tables: every read
asks libvirt about its one object.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import libvirt
import trio

from libvirtfs.drivers import statedir
from libvirtfs.drivers.connection import Connection

log = logging.getLogger(__name__)

Row = TypeVar("Row")

# Which table each kind of change (drivers/events.py Change.kind) is about.
TABLE_OF = {"domain": "domain", "snapshot": "domain", "pool": "pool", "volume": "pool",
            "network": "network"}

DOMAIN_GROUPS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
                 | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_VCPU)
NOWAIT = getattr(libvirt, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", 0)


@dataclass(slots=True)
class DomainRow:
    uuid: str
    name: str
    id: int            # -1 while inactive
    state: int
    reason: int
    # The refreshed part (a full fetch), None after a listing-only fetch.
    info: dict[str, Any] | None = None


@dataclass(slots=True)
class StateRow:
    """A pool's or network's row: its state number (pools) or active flag (networks)."""

    uuid: str
    name: str
    state: int


Fetch = Callable[[libvirt.virConnect, bool], dict[str, Any]]


class Table(Generic[Row]):
    """Every object of one kind on one host: fetched by `fetch(conn, full)` in one hop."""

    def __init__(self, kind: str, connection: Connection, fetch: Fetch,
                 cache_timeout: float) -> None:
        self.kind = kind
        self.connection = connection
        self._fetch = fetch
        self.cache_timeout = cache_timeout
        self._rows: dict[str, Row] = {}
        self._mutex = threading.Lock()  # marks come from libvirt's and worker threads
        self._generation = 0
        self._kept_at: float | None = None      # the listing and states (monotonic)
        self._refreshed_at: float | None = None  # the refreshed part (full fetch)
        self._evented = False
        self._lock = trio.Lock()
        # Fetches begun, and (number, full, rows) of the last one to end: a reader that
        # waited for the lock takes a fetch begun after it asked, kept or not, rather than
        # fetching again (on a busy host an event lands during most fetches).
        self._begun = 0
        self._last: tuple[int, bool, dict[str, Row]] | None = None
        # When a fetch saw objects go: listed again once the records of objects removed
        # elsewhere are past statedir.PRUNE_GRACE, so that a listing drops them (monotonic).
        self._recheck_at: float | None = None

    # -- marks, from any thread --------------------------------------------------------

    def mark(self) -> None:
        """What the table holds may be out of date: the next reader fetches it again,
        and a fetch in flight now is not kept."""
        with self._mutex:
            self._generation += 1
            self._kept_at = self._refreshed_at = None

    def watched(self, evented: bool) -> None:
        """libvirt's events for this kind are registered (True) or not any more."""
        with self._mutex:
            self._evented = evented
            self._generation += 1
            self._kept_at = self._refreshed_at = None

    @property
    def version(self) -> int | None:
        """Changes whenever the listing may have; None while events do not keep it."""
        self._recheck_if_due()
        return self._generation if self._evented else None

    def _recheck_if_due(self) -> None:
        recheck_at = self._recheck_at
        if recheck_at is not None and time.monotonic() >= recheck_at:
            self._recheck_at = None
            self.mark()

    # -- reading, on the trio loop -----------------------------------------------------

    def _fresh(self, full: bool) -> bool:
        self._recheck_if_due()
        now = time.monotonic()
        kept_at = self._kept_at
        if kept_at is None or (not self._evented and now - kept_at >= self.cache_timeout):
            return False
        if full:
            refreshed_at = self._refreshed_at
            return refreshed_at is not None and now - refreshed_at < self.cache_timeout
        return True

    def rows_now(self, *, full: bool = False) -> dict[str, Row] | None:
        """`rows()` when that needs no fetch; else None."""
        return self._rows if self._fresh(full) else None

    async def rows(self, *, full: bool = False) -> dict[str, Row]:
        """uuid -> row; `full`: with the refreshed part.  No thread hop while fresh."""
        if self._fresh(full):
            return self._rows
        asked = self._begun
        async with self._lock:
            if self._fresh(full):
                return self._rows
            last = self._last
            if last is not None and last[0] > asked and (last[1] or not full):
                return last[2]  # as new as a fetch of this reader's own would be
            self._begun += 1
            number = self._begun
            generation, started = self._generation, time.monotonic()
            rows = await self.connection.call(self._fetch, full, changes=False,
                                              what=f"listing of {self.kind}s")
            # Only a reader waiting now can have asked before it began: kept for them alone,
            # not as a second copy of the table for ever.
            self._last = (number, full, rows) if self._lock.statistics().tasks_waiting else None
            if self._rows.keys() - rows.keys():
                self._recheck_at = time.monotonic() + statedir.PRUNE_GRACE + 0.5
            with self._mutex:
                if generation == self._generation:  # else a change landed meanwhile
                    self._rows = rows
                    self._kept_at = started
                    self._refreshed_at = started if full else None
            return rows


# Host folders reached by the same URI are one hypervisor seen twice (`test=URI again=URI`,
# or hosts added by mkdir): a change made through one marks the tables of all, or the
# others answer from an event-kept listing until libvirt's event reaches them, and a
# document just defined through one folder is missing in the other (read-your-writes).
_same_uri: dict[str, weakref.WeakSet[HostTables]] = {}
_same_uri_lock = threading.Lock()


def _mark_same_uri(uri: str) -> None:
    with _same_uri_lock:
        tables = list(_same_uri.get(uri, ()))
    for host_tables in tables:
        host_tables.mark_all()


class HostTables:
    """The domain, pool and network tables of one host, and what marks them."""

    def __init__(self, connection: Connection, cache_timeout: float, *,
                 listed: Callable[[libvirt.virConnect, str, list[str], float], None]
                 = lambda conn, kind, present, since: None) -> None:
        self.enabled = cache_timeout > 0
        self._listed = listed  # told each listing (records of objects gone are pruned)
        self._nowait = NOWAIT  # dropped if the driver refuses it
        self.domain: Table[DomainRow] = Table("domain", connection, self.list_domains,
                                              cache_timeout)
        self.pool: Table[StateRow] = Table("pool", connection, self.list_pools, cache_timeout)
        self.network: Table[StateRow] = Table("network", connection, self.list_networks,
                                          cache_timeout)
        self._tables = {"domain": self.domain, "pool": self.pool, "network": self.network}
        uri = connection.requested_uri or ""
        with _same_uri_lock:
            _same_uri.setdefault(uri, weakref.WeakSet()).add(self)
        connection.on_change(lambda: _mark_same_uri(uri))
        connection.on_late(lambda what: self.mark_all())
        connection.on_lost(lambda reason: self.watching(frozenset()))

    def table(self, kind: str) -> Table[Any] | None:
        return self._tables.get(kind) if self.enabled else None

    def listing_version(self, kind: str) -> int | None:
        table = self.table(kind)
        return table.version if table is not None else None

    # -- marks (any thread) ------------------------------------------------------------

    def mark_all(self) -> None:
        for table in self._tables.values():
            table.mark()

    def changed(self, change: Any) -> None:
        """An event (drivers/events.py Change): its kind's table, or all for the host."""
        table = self._tables.get(TABLE_OF.get(change.kind, ""))
        if table is None:
            self.mark_all()
        else:
            table.mark()

    def watching(self, kinds: frozenset[str]) -> None:
        """The kinds whose lifecycle events are registered on the connection now."""
        for kind, table in self._tables.items():
            table.watched(kind in kinds)

    # -- fetches (worker thread, one hop each) -----------------------------------------

    def list_domains(self, conn: libvirt.virConnect, full: bool) -> dict[str, DomainRow]:
        """Every domain's identity and state (one call), and with `full` what `info`
        shows (three more, plus `info()` of the domains whose stats lack something:
        every domain on the test driver, whose stats have only the state)."""
        since = time.time()
        groups = DOMAIN_GROUPS if full else libvirt.VIR_DOMAIN_STATS_STATE
        try:
            stats = self._domain_stats(conn, groups)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise
            stats = [(dom, _state_stats(dom)) for dom in conn.listAllDomains(0)]
        rows = {}
        listed = []  # (domain, its stats, its row): each asked for its UUID once
        for dom, values in stats:
            uuid = dom.UUIDString()
            row = rows[uuid] = DomainRow(uuid, dom.name(), dom.ID(),
                                         values.get("state.state", 0),
                                         values.get("state.reason", 0))
            listed.append((dom, values, row))
        self._listed(conn, "domain", list(rows), since)
        if full:
            flags = {"persistent": libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT,
                     "autostart": libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART,
                     "managed-save": libvirt.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE}
            having = {key: _uuids(conn.listAllDomains, flag) for key, flag in flags.items()}
            for dom, values, row in listed:
                row.info = _domain_info(dom, row, values)
                for key, uuids in having.items():
                    row.info[key] = (row.uuid in uuids if uuids is not None
                                     else _ask(dom, key))
        return rows

    def _domain_stats(self, conn: libvirt.virConnect, groups: int) -> list[tuple[Any, dict]]:
        """getAllDomainStats, without waiting for a domain whose QEMU is busy (NOWAIT:
        what needs its monitor is left out, and `info()` fills in) where the driver
        takes the flag."""
        if self._nowait and groups != libvirt.VIR_DOMAIN_STATS_STATE:
            try:
                return conn.getAllDomainStats(groups, self._nowait)
            except libvirt.libvirtError as e:
                if e.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG,
                                              libvirt.VIR_ERR_NO_SUPPORT):
                    raise
                log.debug("%s: getAllDomainStats refuses NOWAIT", conn.getURI())
                self._nowait = 0
        return conn.getAllDomainStats(groups, 0)

    def list_pools(self, conn: libvirt.virConnect, full: bool) -> dict[str, StateRow]:
        """Every pool and its state: inactive, or what `info()` says of an active one
        (running, degraded, inaccessible): two calls and one per active pool."""
        since = time.time()
        active = _uuids(conn.listAllStoragePools,
                        libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
        rows = {}
        for pool in conn.listAllStoragePools(0):
            uuid = pool.UUIDString()
            if active is None or uuid in active:
                state = pool.info()[0]
            else:
                state = libvirt.VIR_STORAGE_POOL_INACTIVE
            rows[uuid] = StateRow(uuid, pool.name(), state)
        self._listed(conn, "pool", list(rows), since)
        return rows

    def list_networks(self, conn: libvirt.virConnect, full: bool) -> dict[str, StateRow]:
        """Every network and whether it is active: two calls."""
        since = time.time()
        active = _uuids(conn.listAllNetworks, libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE)
        rows = {}
        for net in conn.listAllNetworks(0):
            uuid = net.UUIDString()
            is_active = uuid in active if active is not None else bool(net.isActive())
            rows[uuid] = StateRow(uuid, net.name(), int(is_active))
        self._listed(conn, "network", list(rows), since)
        return rows


def _state_stats(dom: Any) -> dict[str, int]:
    state, reason = dom.state(0)
    return {"state.state": state, "state.reason": reason}


def _uuids(list_all: Callable[[int], list[Any]], flag: int) -> set[str] | None:
    """The UUIDs a filtered listing gives; None if the driver cannot filter so."""
    try:
        return {obj.UUIDString() for obj in list_all(flag)}
    except libvirt.libvirtError as e:
        log.debug("listing with filter %#x: %s", flag, e.get_error_message())
        return None


def _ask(dom: Any, key: str) -> bool:
    """One domain's persistent, autostart or managed-save, asked alone."""
    try:
        if key == "persistent":
            return bool(dom.isPersistent())
        if key == "autostart":
            return bool(dom.autostart())
        return bool(dom.hasManagedSaveImage(0))
    except libvirt.libvirtError:
        return False


def _domain_info(dom: Any, row: DomainRow, values: dict[str, Any]) -> dict[str, Any]:
    """vcpus, memory, max-memory and cpu-time as `virDomainGetInfo` gives them: from the
    stats, or from `info()` where they lack one (the test driver; a busy QEMU)."""
    vcpus = values.get("vcpu.current")
    memory = values.get("balloon.current")
    max_memory = values.get("balloon.maximum")
    # An inactive domain used no CPU (QEMU's stats report the daemon's own then).
    cpu_time = values.get("cpu.time") if row.id >= 0 else 0
    if None in (vcpus, memory, max_memory, cpu_time):
        _, max_memory, memory, vcpus, cpu_time = dom.info()
    return {"vcpus": vcpus, "memory": memory, "max-memory": max_memory,
            "cpu-time": cpu_time}
