"""A QEMU process held to a small share of one CPU, as libvirt's `<cputune>` emulator quota
would hold it on a busy host (the test bed runs with `cgroup_controllers = [ ]`, so libvirt
sets none itself).

A save of a guest's 768 MiB takes under two seconds at full speed here, and a test that
must act while it runs (abort it, start a second job, watch it move) raced its end: about
one run in three, the save had finished before the `abort` came.  Capped, the same save
takes tens of seconds, and the test acts well inside it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# These machines' cgroups are hybrid: v1 controllers under /sys/fs/cgroup/* (docs/testbed.md).
CPU = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


@contextlib.contextmanager
def cpu_capped(pid: int, percent: float) -> Iterator[None]:
    """Every thread of process `pid` (those it starts later too, such as QEMU's migration
    thread) gets at most `percent` of one CPU until the block ends."""
    if not (CPU / "cpu.cfs_quota_us").exists():
        pytest.skip(f"no cgroup v1 cpu controller at {CPU} to slow QEMU down with")
    home = CPU / _cpu_group(pid).lstrip("/")
    group = CPU / f"libvirtfs-test-{os.getpid()}-{pid}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(PERIOD_US * percent / 100))))
        (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        # Back where it was, so that this group can go (an exited process has left).
        for task in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (home / "cgroup.procs").write_text(task)
        group.rmdir()


def _cpu_group(pid: int) -> str:
    """The process's group in the cpu hierarchy ("/" unless something put it elsewhere)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    return "/"
