"""The benchmark's instruments: request and call counts read from outside the mount, and
the benchmark itself (contrib/bench.sh --smoke), which must keep running.  Nothing here
depends on timings."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import REPO, Mounted, run, sh


def counters(mounted: Mounted) -> dict[str, int]:
    """`getfattr -n user.counters MOUNTPOINT`, as `name count` pairs."""
    text = run("getfattr", "--only-values", "-n", "user.counters", mounted.path).stdout
    return {name: int(n) for name, n in (line.split() for line in text.splitlines())}


def test_a_mount_counts_its_requests_and_libvirt_calls(mount_factory, monkeypatch) -> None:
    monkeypatch.setenv("LIBVIRTFS_COUNT_CALLS", "1")
    demo = mount_factory("test:///default")
    before = counters(demo)
    assert sh(f"cat {demo.host()}/domains/test/state").stdout == "running\n"
    after = counters(demo)
    assert after["fuse.open"] - before["fuse.open"] == 1
    assert after["fuse.read"] > before["fuse.read"]
    # Reading the counters is two requests: getfattr asks for the size, then the value.
    assert after["fuse.getxattr"] - before["fuse.getxattr"] == 2
    assert after["fuse.total"] == sum(n for name, n in after.items()
                                      if name.startswith("fuse.") and name != "fuse.total")
    assert after["libvirt.total"] >= before["libvirt.total"] > 0
    assert "libvirt.hops" in after


def test_libvirt_calls_are_counted_only_when_asked(mount_factory, monkeypatch) -> None:
    monkeypatch.delenv("LIBVIRTFS_COUNT_CALLS", raising=False)
    demo = mount_factory("test:///default")
    names = counters(demo)
    assert names["fuse.lookup"] >= 0
    assert not [name for name in names if name.startswith("libvirt.")]


def test_the_counters_are_not_listed_so_copies_never_carry_them(demo: Mounted) -> None:
    assert "user.counters" not in run("getfattr", "-d", "-m", "-", demo.path, check=False).stdout
    assert "user.counters" not in os.listxattr(demo.path)


def test_the_benchmark_runs(tmp_path: Path) -> None:
    """contrib/bench.sh --smoke: 20 domains, one run of every test-driver workload on both
    filesystems; a table and the bars come out, are written where asked, and nothing is
    left mounted.  With a cache time of 0.2 s: the run waits that (plus 0.3 s) fourteen
    times for what it read to expire, which at the default 1 s was most of its time."""
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\nkept\n")
    result = run("bash", REPO / "contrib/bench.sh", "--smoke", "--cache-timeout", "0.2",
                 "--output", out, timeout=600)
    page = out.read_text()
    assert page.startswith("# Performance\n\nkept\n")
    for row in ("`ls -l domains/` | cold", "`cat */state` | expired", "`cat */info` | hot",
                "`grep -l running */state` | hot", "`cat */xml` | cold",
                "`stat nosuchN`, per miss", "`mkdir snapshots/s{01..20}`", "8 readers",
                "RSS right after mounting", "### The bars of issue 9"):
        assert row in page, row
    assert "failed" not in page.split("### The bars")[0], page
    assert page.count("contrib/bench.sh writes from here") == 1
    assert result.stdout.strip() in page
    work = re.search(r"work folder: (\S+)", result.stderr).group(1)
    assert not Path(work).exists()
    assert work not in Path("/proc/mounts").read_text()
