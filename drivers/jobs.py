"""Long operations on a domain as jobs: run past the per-call timeout, watched, abortable.

A managed save, a memory snapshot, the deletion of an external snapshot or a migration is
one blocking libvirt call that may take minutes.  `Jobs.run(uuid, what, fn)` runs
`fn(conn)` through `Connection.call_long` (no timeout, not a stuck call for the hung-host
rule), while a poller asks libvirt for the domain's job stats (`jobStats`, an ordinary
short call) every POLL_SECONDS.  The stats and, once the job has ended, its outcome make
the domain's `job` file (`status`), which therefore never waits on libvirt.

- `abort(uuid)` calls `abortJob`; the writer that started the job gets ECANCELED.
- A job whose counters have not moved, or whose stats libvirt has not given at all (a
  stuck QEMU monitor), for `stall_seconds` is aborted the same way, and its writer gets
  ETIMEDOUT.  A job libvirt reports without counters (an internal snapshot) cannot be
  judged and is never taken for stalled; nor is one on a hypervisor without job stats.
- A second job on a domain while one runs is refused with EBUSY, here or by libvirt.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
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
    polling: bool = False  # a jobStats call is in flight
    aborting: bool = False  # an abortJob call is in flight
    pollable: bool = True  # False once the hypervisor says it has no job stats
    finished: trio.Event = field(default_factory=trio.Event)

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

    def running_jobs(self) -> list[str]:
        """What runs now on this host's domains (rmdir of the host waits for them)."""
        return [record.what for record in self._records.values() if record.running]

    def record(self, uuid: str) -> JobRecord | None:
        return self._records.get(uuid)

    def carry(self, uuid: str, record: JobRecord) -> None:
        """A domain migrated here from another host of the mount: its `job` here tells
        how the migration ended."""
        self._records[uuid] = record

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
        failure: DriverError | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, uuid, record)
                try:
                    result = await self.connection.call_long(fn, what=f"job {what}")
                except DriverError as e:
                    failure = e
                finally:
                    record.ended = time.monotonic()
                    # The writer hears at once: a poll in flight is given up (it only
                    # reads; its thread finishes alone, see _poll).
                    record.finished.set()
                    nursery.cancel_scope.cancel()
        except BaseException:
            # The writer went away (killed) or the mount is going: the job must not run
            # on unseen; abort it, so that the VM stays where it was.
            record.status, record.error = "cancelled", "its writer went away"
            record.ended = record.ended or time.monotonic()
            self._abort_soon(uuid)
            raise
        if failure is not None:
            raise self._ended_with(record, failure) from None
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

    async def _watch(self, uuid: str, record: JobRecord) -> None:
        """Poll the job's stats until it ends, in tasks of their own (a poll may wait on
        a stuck QEMU monitor; one in flight is not doubled); abort the job if it stalls."""
        async with trio.open_nursery() as nursery:
            while not record.finished.is_set():
                with trio.move_on_after(self.poll_seconds):
                    await record.finished.wait()
                if record.finished.is_set():
                    break
                if not record.polling and record.pollable:
                    record.polling = True
                    nursery.start_soon(self._poll, uuid, record)
                now = time.monotonic()
                if (record.pollable and record.abort_reason in (None, "stalled")
                        and now - max(record.progress_at, record.abort_at or 0.0)
                        >= self.stall_seconds):
                    # Asked again each stall period until libvirt takes it (a stuck
                    # monitor may hold the first request back).
                    log.warning("%s made no progress for %g s: aborting it", record.what,
                                self.stall_seconds)
                    record.abort_reason, record.abort_at = "stalled", now
                    nursery.start_soon(self._abort_quietly, uuid, record)

    async def _poll(self, uuid: str, record: JobRecord) -> None:
        """One jobStats call.  `record.polling` stays set until its thread is out of
        libvirt, even after the call timed out: on a stuck monitor each poll holds one of
        the few requests libvirtd serves a client at once, and piling them up would
        starve every other call of the host."""
        started = threading.Event()

        def fetch(conn: libvirt.virConnect) -> dict[str, Any]:
            started.set()
            try:
                return _job_stats(conn, uuid)
            finally:
                record.polling = False

        try:
            stats = await self.connection.call(fetch, what="job stats", changes=False)
        except OSError as e:
            if not started.is_set():
                record.polling = False  # given up before it began: it never will
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                log.debug("no job stats for %s: %s", record.what, e)
                record.pollable = False  # this hypervisor cannot say: nothing to watch
            return  # no answer is no progress
        if record.finished.is_set():
            return
        record.stats = stats
        progress = _progress(stats)
        # Counters that moved are progress; an answer without counters (a job libvirt
        # measures nothing of) cannot be judged, and counts as alive.  No answer, or
        # counters that stay put, is no progress.
        if progress is None or progress != record.progress:
            record.progress, record.progress_at = progress, time.monotonic()

    async def _abort_quietly(self, uuid: str, record: JobRecord) -> None:
        with contextlib.suppress(OSError):
            await self._abort_call(uuid, record)

    def _abort_soon(self, uuid: str) -> None:
        """abortJob from a thread of its own, for a job nobody waits for any more."""
        def abort() -> None:
            try:
                with self.connection.using() as conn:
                    conn.lookupByUUIDString(uuid).abortJob()
            except (OSError, libvirt.libvirtError) as e:
                log.info("aborting a job nobody waits for: %s", e)
        threading.Thread(target=abort, name="libvirtfs-abort", daemon=True).start()

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
        """abortJob, one at a time per job (like the polls, a request stuck behind a
        stuck monitor is not doubled; `record.aborting` clears when its thread is out)."""
        for attempt in range(ABORT_ATTEMPTS):
            if record.aborting:
                return  # one is on its way
            record.aborting = True
            started = threading.Event()

            def abort(conn: libvirt.virConnect, started: threading.Event = started) -> None:
                started.set()
                try:
                    conn.lookupByUUIDString(uuid).abortJob()
                finally:
                    record.aborting = False

            try:
                await self.connection.call(abort, what=f"abort of {record.what}")
                return
            except DriverError as e:
                if not started.is_set():
                    record.aborting = False
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
