"""How the last block job of each disk ended, from libvirt's BLOCK_JOB_2 events.

libvirt forgets a block job the moment it ends: `virDomainGetBlockJobInfo` then says
nothing, so a `job` file read after a pivot, an abort or a failure could not tell them
apart.  Only the event says how it ended (completed, failed, cancelled).  `BlockJobOutcomes`
keeps that word per (domain UUID, disk target), written on libvirt's event thread and read
on trio's, hence the lock.  It is small on purpose: at most MAX_OUTCOMES disks (the oldest
go first), an outcome is dropped once a listing no longer has its domain, once a newer job
is seen running on the disk, and all of them when the connection is lost (events missed
while it was down would leave an older outcome posing as the last one).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from libvirtfs.drivers import eventwords

MAX_OUTCOMES = 1024
# virDomainBlockJobStatus: READY is no end, the job runs on until pivot or abort.
READY = 3


@dataclass(frozen=True)
class Outcome:
    kind: str  # pull, copy, commit, active-commit, backup
    status: str  # completed, failed, cancelled
    seq: int  # order of arrival, to tell it from a job seen running later
    when: float  # time.time() at arrival, to tell it from a listing made before


class BlockJobOutcomes:
    """The last ended block job of each disk, as `kind status` (`active-commit completed`)."""

    def __init__(self, limit: int = MAX_OUTCOMES) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._ended: OrderedDict[tuple[str, str], Outcome] = OrderedDict()
        self._seq = 0

    def ended(self, uuid: str, target: str, kind: int, status: int) -> None:
        """A BLOCK_JOB_2 event (libvirt's thread); `target` is the disk's (vda)."""
        if status == READY:
            return
        event, job = eventwords.block_job(status, kind)
        with self._lock:
            self._seq += 1
            key = (uuid, target)
            self._ended.pop(key, None)
            self._ended[key] = Outcome(job, event.removeprefix("block-job-"), self._seq,
                                       time.time())
            while len(self._ended) > self._limit:
                self._ended.popitem(last=False)

    def last(self, uuid: str, target: str) -> str | None:
        with self._lock:
            outcome = self._ended.get((uuid, target))
        return None if outcome is None else f"{outcome.kind} {outcome.status}"

    def mark(self) -> int:
        """Taken before asking libvirt whether a job runs (see `running`)."""
        with self._lock:
            return self._seq

    def running(self, uuid: str, target: str, mark: int) -> None:
        """A job was seen running on the disk by a call made after `mark`: an outcome
        that came before is of an older job, and no longer the last one."""
        with self._lock:
            outcome = self._ended.get((uuid, target))
            if outcome is not None and outcome.seq <= mark:
                del self._ended[(uuid, target)]

    def listed(self, present: list[str], since: float) -> None:
        """A listing of every domain, begun at `since`: the domains it lacks are gone
        (an outcome that came after it began may be of a domain defined meanwhile)."""
        keep = set(present)
        with self._lock:
            for key in [key for key, outcome in self._ended.items()
                        if key[0] not in keep and outcome.when < since]:
                del self._ended[key]

    def clear(self, reason: str = "") -> None:
        """The connection was lost: what ends until it is back sends no event."""
        with self._lock:
            self._ended.clear()
