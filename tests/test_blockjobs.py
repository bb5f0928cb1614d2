"""How the last block job of a disk ended (drivers/blockjobs.py), kept from BLOCK_JOB_2
events: the rules that keep it true and small.  The events themselves come from a real
QEMU in tests/test_qemu_disks.py; libvirt's test driver has no block jobs."""

from __future__ import annotations

import time

import libvirt

from libvirtfs.drivers.blockjobs import BlockJobOutcomes

A, B = "uuid-a", "uuid-b"
COMPLETED = libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED
CANCELED = libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED
READY = libvirt.VIR_DOMAIN_BLOCK_JOB_READY
COPY = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY
ACTIVE_COMMIT = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT


def test_the_last_end_per_disk_in_the_words_of_the_events_stream() -> None:
    outcomes = BlockJobOutcomes()
    assert outcomes.last(A, "vda") is None
    outcomes.ended(A, "vda", COPY, READY)  # ready is no end
    assert outcomes.last(A, "vda") is None
    outcomes.ended(A, "vda", COPY, CANCELED)
    outcomes.ended(A, "vdb", ACTIVE_COMMIT, COMPLETED)
    assert outcomes.last(A, "vda") == "copy cancelled"
    assert outcomes.last(A, "vdb") == "active-commit completed"
    assert outcomes.last(B, "vda") is None
    outcomes.ended(A, "vda", COPY, COMPLETED)
    assert outcomes.last(A, "vda") == "copy completed"


def test_a_job_seen_running_hides_only_older_ends() -> None:
    outcomes = BlockJobOutcomes()
    outcomes.ended(A, "vda", COPY, CANCELED)
    mark = outcomes.mark()
    outcomes.running(A, "vda", mark)  # a newer job runs: the old end is not the last
    assert outcomes.last(A, "vda") is None
    mark = outcomes.mark()
    outcomes.ended(A, "vda", COPY, COMPLETED)  # it ended while we asked libvirt
    outcomes.running(A, "vda", mark)
    assert outcomes.last(A, "vda") == "copy completed"


def test_gone_domains_a_lost_connection_and_the_bound_drop_ends() -> None:
    outcomes = BlockJobOutcomes(limit=3)
    outcomes.ended(A, "vda", COPY, COMPLETED)
    time.sleep(0.001)  # apart on any clock
    since = time.time()
    time.sleep(0.001)
    outcomes.ended(B, "vda", COPY, COMPLETED)  # B was defined while the listing ran
    outcomes.listed([], since)
    assert (outcomes.last(A, "vda"), outcomes.last(B, "vda")) == (None, "copy completed")
    for target in ("vdb", "vdc", "vdd"):
        outcomes.ended(B, target, COPY, COMPLETED)
    assert outcomes.last(B, "vda") is None  # the oldest went first
    assert outcomes.last(B, "vdd") == "copy completed"
    outcomes.clear("eof")
    assert outcomes.last(B, "vdd") is None
