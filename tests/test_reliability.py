"""A slow, failing or vanished host never freezes the rest of the mount.

Faults come from drivers/faults.py around the real test driver (LIBVIRTFS_FAULTS).
"""

from __future__ import annotations

import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import check_clean_exit, start_mount


@pytest.fixture
def two_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`good` and `sick` hosts in one mount; write rules for `sick` into the returned file."""
    host_xml = tmp_path / "sick.xml"
    host_xml.write_text("<node><domain type='test'><name>vm</name><memory>65536</memory>"
                        "<os><type>hvm</type></os></domain></node>")
    rules = tmp_path / "faults"
    monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
    sick_uri = f"test://{host_xml}"
    mounted = start_mount(tmp_path / "mnt", "good=test:///default", f"sick={sick_uri}",
                          options="timeout=1,cache_timeout=0", log=tmp_path / "log")
    yield mounted, rules, sick_uri
    rules.unlink(missing_ok=True)
    time.sleep(1)  # let abandoned calls finish before unmounting
    check_clean_exit(mounted)


def read_errno(path: Path) -> int:
    try:
        path.read_text()
    except OSError as e:
        return e.errno
    return 0


def test_hung_host_times_out_while_the_other_answers(two_hosts) -> None:
    mounted, rules, sick_uri = two_hosts
    good = mounted.host("good") / "domains/test/state"
    sick = mounted.host("sick") / "domains/vm/state"
    assert sick.read_text() == "running\n"
    rules.write_text(f"{sick_uri} delay 3\n")

    with ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        stuck = [pool.submit(read_errno, sick) for _ in range(3)]
        time.sleep(0.2)
        # The healthy host answers at once while the sick one hangs.
        for _ in range(20):
            assert good.read_text() == "running\n"
        assert time.monotonic() - started < 1.0
        assert sorted(os.listdir(mounted.path / "hosts")) == ["good", "sick"]
        assert [f.result() for f in stuck] == [errno.ETIMEDOUT] * 3
        assert time.monotonic() - started < 3.0

    rules.unlink()
    time.sleep(3)  # the abandoned calls finish and give their worker slots back
    assert sick.read_text() == "running\n"
    assert "did not answer" in mounted.log()


def test_failing_host_reports_its_errno(two_hosts) -> None:
    mounted, rules, sick_uri = two_hosts
    rules.write_text(f"{sick_uri} error {errno.EACCES}\n")
    assert read_errno(mounted.host("sick") / "domains/vm/info") == errno.EACCES
    # A listing still works where what it holds cannot be read.
    assert os.listdir(mounted.host("good") / "domains") == ["test"]
    rules.unlink()
    assert (mounted.host("sick") / "domains/vm/state").read_text() == "running\n"


def test_dropped_connection_reconnects(two_hosts) -> None:
    mounted, rules, sick_uri = two_hosts
    state = mounted.host("sick") / "domains/vm/state"
    assert state.read_text() == "running\n"
    rules.write_text(f"{sick_uri} drop\n")
    # The call in flight may fail (stat hides it: the size is then unknown, 0)...
    assert read_errno(state) in (0, errno.ENOTCONN, errno.EIO)
    assert state.read_text() == "running\n"  # ...and the next one has reconnected.
    assert f"connection to {sick_uri} closed" in mounted.log()


def test_unmount_is_clean_while_a_host_hangs(tmp_path: Path, monkeypatch) -> None:
    host_xml = tmp_path / "hung.xml"
    host_xml.write_text("<node><domain type='test'><name>vm</name><memory>65536</memory>"
                        "<os><type>hvm</type></os></domain></node>")
    rules = tmp_path / "faults"
    monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
    mounted = start_mount(tmp_path / "mnt", f"hung=test://{host_xml}",
                          options="timeout=1", log=tmp_path / "log")
    rules.write_text(f"test://{host_xml} delay 60\n")
    assert read_errno(mounted.host("hung") / "domains/vm/info") == errno.ETIMEDOUT
    started = time.monotonic()
    check_clean_exit(mounted)  # fusermount3 -u, exit status 0, no traceback
    assert time.monotonic() - started < 10
