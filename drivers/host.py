"""What the tree asks of one hypervisor host, in plain Python values.

Each public coroutine runs one short piece of libvirt code in a worker thread (see
`Connection.call`).  Objects are addressed by UUID where libvirt has one (domains, pools,
networks), so a rename never changes identity; snapshots and volumes by name within their
parent.  Only libvirt's portable API is used, so every driver (QEMU, LXC, Xen, test, ...)
works; what a hypervisor lacks surfaces as DriverError(EOPNOTSUPP) for that call alone.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import trio

from libvirtfs.drivers import migration, records, statedir, xmldocs
from libvirtfs.drivers.blockjobs import BlockJobOutcomes
from libvirtfs.drivers.connection import Connection
from libvirtfs.drivers.control import ACTIONS, JOB_WORDS, remove_object, rename_object
from libvirtfs.drivers.definitions import KINDS, Definitions, Key
from libvirtfs.drivers.disks import DiskCalls
from libvirtfs.drivers.errors import DriverError
from libvirtfs.drivers.jobs import DEFAULT_STALL_SECONDS, Jobs
from libvirtfs.drivers.snapshots import SnapshotCalls
from libvirtfs.drivers.states import (
    domain_reason_word,
    domain_state_word,
    pool_state_word,
    version_string,
    volume_type_word,
)
from libvirtfs.drivers.tables import DomainRow, HostTables, Table

log = logging.getLogger(__name__)

Info = dict[str, Any]
T = TypeVar("T")


def _state_words(row: DomainRow) -> tuple[str, str]:
    return domain_state_word(row.state), domain_reason_word(row.state, row.reason)


def _info_of(row: DomainRow) -> Info:
    """A domain's `info`, from its row in a table refreshed in full."""
    return {
        "name": row.name,
        "uuid": row.uuid,
        "id": row.id if row.id >= 0 else "-",
        "state": domain_state_word(row.state),
        "reason": domain_reason_word(row.state, row.reason),
        **(row.info or {}),
    }


def _domain(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain:
    return conn.lookupByUUIDString(uuid)


def _pool(conn: libvirt.virConnect, uuid: str) -> libvirt.virStoragePool:
    return conn.storagePoolLookupByUUIDString(uuid)


def _network(conn: libvirt.virConnect, uuid: str) -> libvirt.virNetwork:
    return conn.networkLookupByUUIDString(uuid)


class Host(SnapshotCalls, DiskCalls):
    """One hypervisor host reached through one libvirt URI (nodes/backend.py says what the
    tree asks of it)."""

    max_document_bytes = xmldocs.MAX_DOCUMENT_BYTES

    def __init__(self, connection: Connection, state_dir: Path | None = None, *,
                 job_stall: float = DEFAULT_STALL_SECONDS, cache_timeout: float = 1.0) -> None:
        self.connection = connection
        self.definitions = Definitions(statedir.StateDir(state_dir or statedir.default_state_dir()))
        # How each disk's last block job ended, from events (drivers/blockjobs.py).
        self.block_jobs = BlockJobOutcomes()
        connection.on_lost(self.block_jobs.clear)
        # Every domain, pool and network with its state, from batched calls (tables.py).
        self.tables = HostTables(connection, cache_timeout, listed=self._prune)
        self.jobs = Jobs(connection, stall_seconds=job_stall)
        self._arriving: list[str] = []  # migrations of other hosts into this one, running
        self._migrates: bool | None = None  # known once asked, until the connection is lost
        self._asking_migrates: trio.Event | None = None  # set when the call in flight ends
        connection.on_lost(self._forget_migrates)

    # -- jobs (drivers/jobs.py) --------------------------------------------------------

    async def run_job(self, uuid: str, what: str,
                      fn: Callable[[libvirt.virConnect], T]) -> T:
        """`fn(conn)` (blocking, in a worker thread) as a job on domain `uuid`: no
        per-call timeout, watched in `job`, abortable; `what` names it there."""
        return await self.jobs.run(uuid, what, fn)

    def job_running(self, uuid: str) -> bool:
        return self.jobs.running(uuid)

    def busy_with(self) -> list[str]:
        """Jobs of this mount that need this host's connection now: its own, and
        migrations into it.  Closing it under them would leave them unabortable."""
        return [*self.jobs.running_jobs(), *self._arriving]

    async def domain_job(self, uuid: str) -> Info:
        """The `job` file: the running job's stats, or the last job's outcome; {} when
        no job of this mount ran on the domain."""
        return self.jobs.status(uuid)

    async def abort_job(self, uuid: str) -> None:
        await self.jobs.abort(uuid)

    async def open(self) -> None:
        """Connect now, so that a bad URI or an unreachable host fails at mount time."""
        await self.connection.call(lambda conn: None, changes=False)

    # -- host --------------------------------------------------------------------------

    def status(self) -> str:
        return self.connection.status()

    async def uri(self) -> str:
        return await self.connection.call(lambda conn: conn.getURI(), changes=False)

    async def hostname(self) -> str:
        return await self.connection.call(lambda conn: conn.getHostname(), changes=False)

    async def driver_type(self) -> str:
        return await self.connection.call(lambda conn: conn.getType(), changes=False)

    async def info(self) -> Info:
        def fetch(conn: libvirt.virConnect) -> Info:
            model, memory_mib, cpus, mhz, nodes, sockets, cores, threads = conn.getInfo()
            try:
                hv_version = version_string(conn.getVersion())
            except libvirt.libvirtError:
                hv_version = "unknown"
            try:  # KiB, as virsh nodeinfo prints; getInfo rounds to MiB
                memory_kib = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)["total"]
            except (libvirt.libvirtError, KeyError):
                memory_kib = memory_mib * 1024
            return {
                "hostname": conn.getHostname(),
                "hypervisor": conn.getType(),
                "hypervisor-version": hv_version,
                "libvirt-version": version_string(conn.getLibVersion()),
                "cpu-model": model,
                "cpus": cpus,
                "cpu-mhz": mhz,
                "numa-nodes": nodes,
                "sockets": sockets,
                "cores": cores,
                "threads": threads,
                "memory": memory_kib,
            }
        return await self.connection.call(fetch, changes=False)

    async def capabilities(self) -> str:
        return await self.connection.call(lambda conn: conn.getCapabilities(), changes=False)

    async def migrates(self) -> bool:
        """Whether this hypervisor migrates domains at all: its capabilities announce
        <migration_features> (QEMU's do; the test driver's and LXC's do not).  Asked once
        per connection (the daemon may be another one after a reconnect), since reading
        any domain's `control` lists `migrate` by it: a thousand first readers share one
        call, and if it fails they hear False (the listing goes on without `migrate`)."""
        if self._migrates is not None:
            return self._migrates
        if self._asking_migrates is not None:
            await self._asking_migrates.wait()
            return bool(self._migrates)
        self._asking_migrates = asked = trio.Event()
        try:
            caps = xmldocs.from_libvirt(await self.capabilities())
            self._migrates = caps.find("host/migration_features") is not None
        except OSError as e:
            log.debug("capabilities, for whether domains migrate: %s", e)
        finally:
            self._asking_migrates = None
            asked.set()
        return bool(self._migrates)

    def _forget_migrates(self, reason: str) -> None:
        self._migrates = None

    # -- domains -----------------------------------------------------------------------

    def listing_version(self, kind: str) -> int | None:
        """Moves whenever the listing of `kind` may have changed; None while no event
        keeps it true (nodes/objects.py CollectionDirectory lists again by time then)."""
        return self.tables.listing_version(kind)

    def stale(self, kind: str) -> None:
        """The next listing of `kind` (and its states) asks libvirt, whatever the table
        holds: the tree was told that it may be out of date."""
        table = self.tables.table(kind)
        if table is not None:
            table.mark()

    async def list_domains(self) -> list[tuple[str, str]]:
        """(uuid, name) of every domain, active or defined: one libvirt call."""
        if self.tables.enabled:
            return [(row.uuid, row.name) for row in (await self.tables.domain.rows()).values()]

        def fetch(conn: libvirt.virConnect) -> list[tuple[str, str]]:
            since = time.time()
            domains = [(d.UUIDString(), d.name()) for d in conn.listAllDomains(0)]
            self._prune(conn, "domain", [uuid for uuid, _ in domains], since)
            return domains
        return await self.connection.call(fetch, changes=False)

    def _prune(self, conn: libvirt.virConnect, kind: str, present: list[str], since: float,
               scope: str = "") -> None:
        """Drop the records (kept outside libvirt) of objects removed outside libvirtfs; a
        listing never fails for it."""
        if kind == "domain":
            self.block_jobs.listed(present, since)
        try:
            self.definitions.prune(conn, kind, present, since, scope)
        except (OSError, libvirt.libvirtError) as e:
            log.debug("pruning %s records: %s", kind, e)

    # The `_now` forms answer from a table at hand, with no await (None: not at hand):
    # the vfs answers a lookup of an expired `state` or `info` at once with them.
    def domain_state_now(self, uuid: str) -> tuple[str, str] | None:
        row = self._row_now(self.tables.domain, uuid)
        return None if row is None else _state_words(row)

    def domain_info_now(self, uuid: str) -> Info | None:
        row = self._row_now(self.tables.domain, uuid, full=True)
        return None if row is None or row.info is None else _info_of(row)

    def pool_state_now(self, uuid: str) -> str | None:
        row = self._row_now(self.tables.pool, uuid)
        return None if row is None else pool_state_word(row.state)

    def network_state_now(self, uuid: str) -> str | None:
        row = self._row_now(self.tables.network, uuid)
        return None if row is None else ("active" if row.state else "inactive")

    def _row_now(self, table: Table[Any], uuid: str, *, full: bool = False) -> Any:
        if not self.tables.enabled:
            return None
        rows = table.rows_now(full=full)
        return None if rows is None else rows.get(uuid)

    async def domain_state(self, uuid: str, *, fresh: bool = False) -> tuple[str, str]:
        """(state, reason) words; `fresh`: asked of libvirt now, not of the table (what a
        control word checks before it is carried out)."""
        if self.tables.enabled and not fresh:
            row = (await self.tables.domain.rows()).get(uuid)
            if row is not None:
                return _state_words(row)

        def fetch(conn: libvirt.virConnect) -> tuple[str, str]:
            state, reason = _domain(conn, uuid).state(0)
            return domain_state_word(state), domain_reason_word(state, reason)
        return await self.connection.call(fetch, changes=False)

    async def domain_info(self, uuid: str) -> Info:
        if self.tables.enabled:
            row = (await self.tables.domain.rows(full=True)).get(uuid)
            if row is not None and row.info is not None:
                return _info_of(row)

        def fetch(conn: libvirt.virConnect) -> Info:
            dom = _domain(conn, uuid)
            state, reason = dom.state(0)
            _, max_mem, mem, vcpus, cpu_time = dom.info()
            dom_id = dom.ID()
            try:
                managed_save = bool(dom.hasManagedSaveImage(0))
            except libvirt.libvirtError:
                managed_save = False
            return {
                "name": dom.name(),
                "uuid": dom.UUIDString(),
                "id": dom_id if dom_id >= 0 else "-",
                "state": domain_state_word(state),
                "reason": domain_reason_word(state, reason),
                "vcpus": vcpus,
                "memory": mem,
                "max-memory": max_mem,
                "cpu-time": cpu_time,
                "persistent": bool(dom.isPersistent()),
                "autostart": bool(dom.autostart()),
                "managed-save": managed_save,
            }
        return await self.connection.call(fetch, changes=False)

    async def domain_live_xml(self, uuid: str) -> str:
        """What libvirt reports now, without libvirtfs's own metadata."""
        return await self.connection.call(
            lambda conn: records.strip(_domain(conn, uuid).XMLDesc(0))[0], changes=False)

    async def list_pools(self) -> list[tuple[str, str]]:
        if self.tables.enabled:
            return [(row.uuid, row.name) for row in (await self.tables.pool.rows()).values()]

        def fetch(conn: libvirt.virConnect) -> list[tuple[str, str]]:
            since = time.time()
            pools = [(p.UUIDString(), p.name()) for p in conn.listAllStoragePools(0)]
            self._prune(conn, "pool", [uuid for uuid, _ in pools], since)
            return pools
        return await self.connection.call(fetch, changes=False)

    async def pool_state(self, uuid: str) -> str:
        if self.tables.enabled:
            row = (await self.tables.pool.rows()).get(uuid)
            if row is not None:
                return pool_state_word(row.state)
        return await self.connection.call(
            lambda conn: pool_state_word(_pool(conn, uuid).info()[0]), changes=False)

    async def pool_info(self, uuid: str) -> Info:
        def fetch(conn: libvirt.virConnect) -> Info:
            pool = _pool(conn, uuid)
            state, capacity, allocation, available = pool.info()
            return {
                "name": pool.name(),
                "uuid": pool.UUIDString(),
                "state": pool_state_word(state),
                "capacity": capacity,
                "allocation": allocation,
                "available": available,
                "persistent": bool(pool.isPersistent()),
                "autostart": bool(pool.autostart()),
            }
        return await self.connection.call(fetch, changes=False)

    async def list_volumes(self, pool_uuid: str) -> list[str]:
        def fetch(conn: libvirt.virConnect) -> list[str]:
            pool = _pool(conn, pool_uuid)
            if not pool.isActive():
                return []  # an inactive pool has no volume list to give
            since = time.time()
            names = [v.name() for v in pool.listAllVolumes(0)]
            self._prune(conn, "volume", names, since, scope=pool_uuid)
            return names
        return await self.connection.call(fetch, changes=False)

    async def volume_path(self, pool_uuid: str, name: str) -> str:
        return await self.connection.call(
            lambda conn: _pool(conn, pool_uuid).storageVolLookupByName(name).path(),
            changes=False)

    async def volume_info(self, pool_uuid: str, name: str) -> Info:
        def fetch(conn: libvirt.virConnect) -> Info:
            vol = _pool(conn, pool_uuid).storageVolLookupByName(name)
            kind, capacity, allocation = vol.info()
            return {
                "name": vol.name(),
                "key": vol.key(),
                "path": vol.path(),
                "type": volume_type_word(kind),
                "capacity": capacity,
                "allocation": allocation,
            }
        return await self.connection.call(fetch, changes=False)

    # -- networks ----------------------------------------------------------------------

    async def list_networks(self) -> list[tuple[str, str]]:
        if self.tables.enabled:
            return [(row.uuid, row.name) for row in (await self.tables.network.rows()).values()]

        def fetch(conn: libvirt.virConnect) -> list[tuple[str, str]]:
            since = time.time()
            networks = [(n.UUIDString(), n.name()) for n in conn.listAllNetworks(0)]
            self._prune(conn, "network", [uuid for uuid, _ in networks], since)
            return networks
        return await self.connection.call(fetch, changes=False)

    async def network_state(self, uuid: str) -> str:
        if self.tables.enabled:
            row = (await self.tables.network.rows()).get(uuid)
            if row is not None:
                return "active" if row.state else "inactive"
        return await self.connection.call(
            lambda conn: "active" if _network(conn, uuid).isActive() else "inactive",
            changes=False)

    async def network_info(self, uuid: str) -> Info:
        def fetch(conn: libvirt.virConnect) -> Info:
            net = _network(conn, uuid)
            try:
                bridge = net.bridgeName()
            except libvirt.libvirtError:
                bridge = ""
            return {
                "name": net.name(),
                "uuid": net.UUIDString(),
                "state": "active" if net.isActive() else "inactive",
                "bridge": bridge,
                "persistent": bool(net.isPersistent()),
                "autostart": bool(net.autostart()),
            }
        return await self.connection.call(fetch, changes=False)

    # -- definitions and actions (any kind: domain, network, pool, volume) -------------

    async def definition(self, kind: str, key: Key) -> bytes:
        """What `xml` shows: the bytes last written, or libvirt's persistent definition."""
        return await self.connection.call(self.definitions.show, kind, key, changes=False)

    async def define(self, kind: str, key: Key | None, name: str | None, data: bytes, *,
                     parent: Key | None = None) -> Key:
        return await self.connection.call(
            lambda conn: self.definitions.define(conn, kind, key, name, data, parent=parent))

    async def control(self, kind: str, key: Key, word: str) -> None:
        """Carry out one control word of nodes/words.py; the caller has checked it."""
        action = ACTIONS[kind][word]
        if kind == "domain" and word == "abort" and self.jobs.running(key):
            await self.jobs.abort(key)
            return
        if kind == "domain" and word in JOB_WORDS:
            await self.run_job(key, word, lambda conn: action(conn, key))
            return
        await self.connection.call(action, key, what=f"{kind} {word}")

    async def autostart(self, kind: str, key: Key) -> bool:
        return await self.connection.call(
            lambda conn: bool(KINDS[kind].lookup(conn, key).autostart()), changes=False)

    async def set_autostart(self, kind: str, key: Key, value: bool) -> None:
        def apply(conn: libvirt.virConnect) -> None:
            KINDS[kind].lookup(conn, key).setAutostart(int(value))
        await self.connection.call(apply)

    async def remove(self, kind: str, key: Key, words: Sequence[str] = ()) -> None:
        """rmdir; `words` are a domain's undefine flags (nodes/words.py UNDEFINE_FLAGS)."""
        def apply(conn: libvirt.virConnect) -> None:
            remove_object(conn, kind, key, words)
            self.definitions.forget(conn, kind, key)
        await self.connection.call(apply)

    async def rename(self, kind: str, key: Key, new_name: str) -> None:
        await self.connection.call(rename_object, kind, key, new_name)

    # -- migration ---------------------------------------------------------------------

    async def migrate(self, uuid: str, destination: Host | str, words: Sequence[str],
                      params: dict[str, str], *, what: str = "migrate") -> None:
        """Move the domain `uuid` to another mounted host (both connections are held for
        the call) or to a URI; returns when libvirt says it has finished.  A job
        (drivers/jobs.py, named `what` in `job`): no per-call timeout, watched, aborted by
        `abort`; if the caller goes away (killed, unmount) the runner aborts it too, and
        the VM stays here."""
        dest_host = destination if isinstance(destination, Host) else None
        dest_uri = destination if isinstance(destination, str) else None
        # A URI no mounted host has (without p2p) is connected before the job, as any
        # host is: bounded by the timeout (a URI that never answers would otherwise
        # hold the writer with no job for job_stall to see), with keepalive.
        opened = (await self._open_destination(dest_uri)
                  if dest_uri is not None and "p2p" not in words else None)
        if dest_host is not None:
            # The same for a mounted host: (re)connected, and not known to be hung, by the
            # bounded path; in the job nothing bounds a destination that never answers.
            await dest_host.connection.call(lambda conn: None, changes=False,
                                            what="connecting to the destination")
        dest = dest_host.connection if dest_host is not None else opened

        def run(conn: libvirt.virConnect) -> None:
            dom = _domain(conn, uuid)
            if dest is None:  # p2p to a URI: the source daemon connects
                migration.migrate(dom, None, dest_uri, words, params)
                return
            with dest.using() as dconn:
                uri = dest.requested_uri or dconn.getURI()
                migration.migrate(dom, dconn, uri, words, params)

        if dest_host is not None:
            dest_host._arriving.append(what)
        try:
            await self.run_job(uuid, what, run)
        finally:
            if dest_host is not None:
                dest_host._arriving.remove(what)
                dest_host.tables.mark_all()  # the domain is there now (or half-way)
            if opened is not None:
                with trio.CancelScope(shield=True):  # bounded; a job still using it closes it
                    await opened.close()
        record = self.jobs.record(uuid)
        if dest_host is not None and record is not None:
            dest_host.jobs.carry(uuid, record)  # `job` there says how it came

    async def _open_destination(self, uri: str) -> Connection:
        """A connection to a destination no mounted host has, for one migration."""
        opened = Connection(uri, timeout=self.connection.timeout)
        try:
            await opened.call(lambda conn: None, what=f"connecting to {uri}", changes=False)
        except DriverError as e:
            with trio.CancelScope(shield=True):
                await opened.close()
            raise DriverError(e.errno or errno.ENOTCONN,
                              f"cannot connect to {uri}: {e.strerror}", e.libvirt_code) from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await opened.close()
            raise
        return opened
