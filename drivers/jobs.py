"""Long operations on a domain as jobs: run past the per-call timeout, watched, abortable.

A managed save, a memory snapshot, the deletion of an external snapshot or a migration is
one blocking libvirt call that may take minutes.  `Jobs.run(uuid, what, fn)` runs
`fn(conn)` through `Connection.call_long` (no timeout, not a stuck call for the hung-host
rule), while a poller asks libvirt for the domain's job stats (`jobStats`, an ordinary
short call) every POLL_SECONDS.  The stats and, once the job has ended, its outcome make
the domain's `job` file (`status`), which therefore never waits on libvirt.

- `abort(uuid)` calls `abortJob`; the writer that started the job gets ECANCELED.
- A job whose counters have not moved for `stall_seconds` is aborted the same way, and its
  writer gets ETIMEDOUT.  Only a job whose stats have shown counters can stall: one that
  libvirt reports no progress for (an internal snapshot) runs as long as it runs.
- A second job on a domain while one runs is refused with EBUSY, here or by libvirt.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import libvirt
import trio

from libvirtfs.drivers.connection import Connection
from libvirtfs.drivers.errors import DriverError

log = logging.getLogger(__name__)

T = TypeVar("T")

POLL_SECONDS = 0.5
DEFAULT_STALL_SECONDS = 300.0
# An abort right after a job began may come before libvirt's side of it: ask again.
ABORT_ATTEMPTS = 10
ABORT_RETRY_SECONDS = 0.2

# libvirt's virDomainJobType and virDomainJobOperation, as words.
JOB_TYPES = {0: "none", 1: "bounded", 2: "unbounded", 3: "completed", 4: "failed",
             5: "cancelled"}
OPERATIONS = {0: "unknown", 1: "start", 2: "save", 3: "restore", 4: "incoming-migration",
              5: "outgoing-migration", 6: "snapshot", 7: "snapshot-revert", 8: "dump",
              9: "backup", 10: "snapshot-delete"}

# `job` file key <- libvirt's job stats key (VIR_DOMAIN_JOB_*), in the order shown.
STATS_KEYS = [
    ("remaining-ms", "time_remaining"),
    ("data-total", "data_total"),
    ("data-processed", "data_processed"),
    ("data-remaining", "data_remaining"),
    ("memory-total", "memory_total"),
    ("memory-processed", "memory_processed"),
    ("memory-remaining", "memory_remaining"),
    ("disk-total", "disk_total"),
    ("disk-processed", "disk_processed"),
    ("disk-remaining", "disk_remaining"),
]
# What moves while a job progresses; a job whose counters stay put has stalled.
PROGRESS_KEYS = ("data_processed", "data_remaining", "memory_processed", "memory_remaining",
                 "disk_processed", "disk_remaining", "memory_iteration", "file_processed")


@dataclass
class JobRecord:
    """One job of libvirtfs on one domain: what it is, what libvirt last said of it, and,
    once ended, how it ended."""

    what: str
    began: float = field(default_factory=time.monotonic)
    stats: dict[str, Any] = field(default_factory=dict)
    status: str = "running"  # then completed, failed or cancelled
    error: str = ""
    ended: float | None = None
    abort_reason: str | None = None  # "abort" (asked for) or "stalled"
    abort_at: float | None = None  # when abortJob was last asked for a stall
    progress: tuple[Any, ...] | None = None
    progress_at: float = field(default_factory=time.monotonic)
    measurable: bool = False  # libvirt has shown counters: a stall can be told

    @property
    def running(self) -> bool:
        return self.status == "running"

    def elapsed_ms(self) -> int:
        return int(((self.ended or time.monotonic()) - self.began) * 1000)

    def render(self) -> dict[str, Any]:
        """The `job` file's lines (docs/hosts.md, Jobs)."""
        lines: dict[str, Any] = {"status": self.status, "job": self.what}
        if not self.running:
            lines["elapsed-ms"] = self.elapsed_ms()
            if self.error:
                lines["error"] = self.error
            return lines
        stats = self.stats
        lines["type"] = JOB_TYPES.get(stats.get("type", 0), "unknown") if stats else "none"
        if "operation" in stats:
            lines["operation"] = OPERATIONS.get(stats["operation"], "unknown")
        lines["elapsed-ms"] = stats.get("time_elapsed", self.elapsed_ms())
        for key, name in STATS_KEYS:
            if name in stats:
                lines[key] = stats[name]
        percent = _percent(stats)
        if percent is not None:
            lines["percent"] = percent
        speed = stats.get("memory_bps", stats.get("disk_bps"))
        if speed is not None:
            lines["speed"] = speed
        if "downtime" in stats:
            lines["expected-downtime-ms"] = stats["downtime"]
        if self.abort_reason is not None:
            lines["aborting"] = ("requested" if self.abort_reason == "abort"
                                 else "no progress (job_stall)")
        return lines


def _percent(stats: dict[str, Any]) -> int | None:
    for total, processed in (("data_total", "data_processed"),
                             ("memory_total", "memory_processed"),
                             ("disk_total", "disk_processed")):
        if stats.get(total):
            return min(100, int(stats.get(processed, 0) * 100 // stats[total]))
    return None


def _progress(stats: dict[str, Any]) -> tuple[Any, ...] | None:
    """The counters that move while a job progresses; None if libvirt shows none."""
    values = tuple(stats.get(key) for key in PROGRESS_KEYS)
    return values if any(value is not None for value in values) else None


def _job_stats(conn: libvirt.virConnect, uuid: str) -> dict[str, Any]:
    return conn.lookupByUUIDString(uuid).jobStats(0)


class Jobs:
    """The jobs of one host, and the last job's record of each domain."""

    def __init__(self, connection: Connection, *, stall_seconds: float = DEFAULT_STALL_SECONDS,
                 poll_seconds: float = POLL_SECONDS) -> None:
        self.connection = connection
        self.stall_seconds = stall_seconds
        self.poll_seconds = poll_seconds
        self._records: dict[str, JobRecord] = {}

    def running(self, uuid: str) -> bool:
        record = self._records.get(uuid)
        return record is not None and record.running

    def record(self, uuid: str) -> JobRecord | None:
        return self._records.get(uuid)

    def status(self, uuid: str) -> dict[str, Any]:
        """The `job` file: the running job, or the last one's outcome; {} if none ran."""
        record = self._records.get(uuid)
        return record.render() if record is not None else {}

    async def run(self, uuid: str, what: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        """`fn(conn)` as a job on domain `uuid`: returns its result, or raises its error;
        ECANCELED if it was aborted, ETIMEDOUT if it stalled, EBUSY if a job runs."""
        current = self._records.get(uuid)
        if current is not None and current.running:
            raise DriverError(errno.EBUSY, f"a job runs on this domain already "
                                           f"({current.what}); wait for it, or "
                                           f"echo abort > control")
        record = JobRecord(what)
        self._records[uuid] = record
        done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, uuid, record, done)
                try:
                    result = await self.connection.call_long(fn, what=f"job {what}")
                finally:
                    record.ended = time.monotonic()
                    done.set()
        except DriverError as e:
            raise self._ended_with(record, e) from None
        except BaseException:
            record.status, record.error = "failed", "the mount is going away"
            record.ended = record.ended or time.monotonic()
            raise
        record.status = "completed"
        return result

    def _ended_with(self, record: JobRecord, error: DriverError) -> DriverError:
        """What the writer of a failed job gets, and what `job` says of it."""
        message = error.strerror or str(error)
        record.error = message
        if record.abort_reason == "abort":
            record.status = "cancelled"
            return DriverError(errno.ECANCELED, f"{record.what} was aborted "
                                                f"(echo abort > control): {message}",
                               error.libvirt_code)
        if record.abort_reason == "stalled":
            record.status = "cancelled"
            record.error = (f"no progress for {self.stall_seconds:g} s (job_stall); "
                            f"{message}")
            return DriverError(errno.ETIMEDOUT, f"{record.what} made no progress for "
                                                f"{self.stall_seconds:g} s (-o job_stall) "
                                                f"and was aborted: {message}",
                               error.libvirt_code)
        record.status = "failed"
        if error.libvirt_code == getattr(libvirt, "VIR_ERR_OPERATION_TIMEOUT", None):
            # libvirt waited for another job of this domain (another program's) to end.
            return DriverError(errno.EBUSY, message, error.libvirt_code)
        return error

    async def _watch(self, uuid: str, record: JobRecord, done: trio.Event) -> None:
        """Poll the job's stats until it ends; abort it if it stalls.  A poll in progress
        is let finish (it is short): a cancelled one would count as a late call."""
        while not done.is_set():
            with trio.move_on_after(self.poll_seconds):
                await done.wait()
            if done.is_set():
                return
            try:
                stats = await self.connection.call(_job_stats, uuid, what="job stats")
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                    log.debug("no job stats for %s: %s", record.what, e)
                    return  # this hypervisor cannot say: no progress to watch
                stats = None  # no answer is no progress
            now = time.monotonic()
            if stats is not None and not done.is_set():
                record.stats = stats
                progress = _progress(stats)
                if progress is not None:
                    record.measurable = True
                    if progress != record.progress:
                        record.progress, record.progress_at = progress, now
            if (record.measurable and record.abort_reason in (None, "stalled")
                    and now - max(record.progress_at, record.abort_at or 0.0)
                    >= self.stall_seconds):
                # Asked again each stall period until libvirt takes it (a stuck monitor
                # may hold the first request back).
                log.warning("%s made no progress for %g s: aborting it", record.what,
                            self.stall_seconds)
                record.abort_reason, record.abort_at = "stalled", now
                await self._abort_call(uuid, record)

    async def abort(self, uuid: str) -> None:
        """`echo abort > control`: abort the running job (abortJob); its writer gets
        ECANCELED.  EINVAL if no job of this mount runs on the domain."""
        record = self._records.get(uuid)
        if record is None or not record.running:
            raise DriverError(errno.EINVAL, "no job runs on this domain; nothing to abort")
        if record.abort_reason is None:
            record.abort_reason = "abort"
        await self._abort_call(uuid, record)

    async def _abort_call(self, uuid: str, record: JobRecord) -> None:
        for attempt in range(ABORT_ATTEMPTS):
            try:
                await self.connection.call(
                    lambda conn: conn.lookupByUUIDString(uuid).abortJob(),
                    what=f"abort of {record.what}")
                return
            except DriverError as e:
                if not record.running:
                    return  # it ended meanwhile: nothing was left to abort
                # Just started: libvirt may not have begun its side of the job yet.
                if (e.libvirt_code == libvirt.VIR_ERR_OPERATION_INVALID
                        and attempt + 1 < ABORT_ATTEMPTS):
                    await trio.sleep(ABORT_RETRY_SECONDS)
                    continue
                log.warning("aborting %s: %s", record.what, e)
                if record.abort_reason == "abort":
                    record.abort_reason = None
                    raise
                return
