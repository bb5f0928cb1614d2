"""A hostile user on a real mount (issue 7): odd names, odd bytes, races, kills.

Each test is one session of someone trying to break the mount with ordinary tools; each
stands for a bug found that way, or for an attack the developers' guide asks to be tried
before anything is called resolved.  After every attack, libvirt must hold what it held.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import xattr
from conftest import Mounted, expect_errno, sh, user_error, write_file


@pytest.fixture
def domains(demo: Mounted) -> Path:
    return demo.host() / "domains"


@pytest.fixture
def snapshots(domains: Path) -> Path:
    return domains / "test" / "snapshots"


@pytest.mark.parametrize("description", [b"a\0b", b"bell\x07", b"esc\x1b[31m"])
def test_a_description_that_xml_cannot_hold_is_refused_at_setfattr(
        snapshots: Path, description: bytes) -> None:
    # $ setfattr -n user.description -v $'bell\a' snapshots; mkdir snapshots/s1
    # Once, setfattr took it, and mkdir failed with EIO and a traceback in the log.
    expect_errno(errno.EINVAL, xattr.setxattr, str(snapshots), "user.description", description)
    assert "XML" in user_error(snapshots)
    os.mkdir(snapshots / "s1")
    assert "<description>" not in (snapshots / "s1" / "xml").read_text()


def test_a_description_with_markup_is_kept_as_text(snapshots: Path) -> None:
    xattr.setxattr(str(snapshots), "user.description", "<b>&amp; été\ttab\nline".encode())
    os.mkdir(snapshots / "s1")
    assert "<description>&lt;b&gt;&amp;amp; été\ttab\nline</description>" in (
        snapshots / "s1" / "xml").read_text()


WEB = ("<domain type='test'><name>web</name><memory unit='KiB'>65536</memory>"
       "<os><type>hvm</type></os></domain>")


def test_removing_empty_folders_removes_no_object(domains: Path, snapshots: Path) -> None:
    # The usual way to clear out empty folders: rmdir ignores the ones that are not empty.
    # An object folder is never empty, yet each of these rmdirs removed a snapshot or domain.
    os.mkdir(domains / "web")
    write_file(domains / "web" / "xml", WEB)
    os.mkdir(snapshots / "s1")
    os.mkdir(domains / "pending")
    sh(f"find {domains} -mindepth 1 -depth -type d "
       f"-exec rmdir --ignore-fail-on-non-empty {{}} +", check=False)  # snapshots/: EPERM
    assert sorted(os.listdir(domains)) == ["test", "web"]  # the empty pending folder went
    assert "s1" in os.listdir(snapshots)
    assert "--ignore-fail-on-non-empty" in user_error(snapshots)
    sh(f"rmdir {snapshots}/s1")  # a plain rmdir still removes the object
    assert os.listdir(snapshots) == []


def peak_memory_mib(mounted: Mounted) -> int:
    status = Path(f"/proc/{mounted.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmHWM:"))) // 1024


@pytest.mark.parametrize("file", ["test/xml", "pending/xml", "pending/scratch",
                                  "test/control", "test/autostart"])
def test_truncate_to_100_gib_is_efbig_at_once(demo: Mounted, domains: Path, file: str) -> None:
    # $ truncate -s 100G domains/test/xml
    # Once: EIO and a MemoryError in the log; `dd seek=10G of=autostart` grew the mount
    # to 10 GiB of memory.
    os.mkdir(domains / "pending")
    (domains / "pending" / "scratch").write_text("x\n")
    path = domains / file
    with open(path, "r+b" if file in ("test/xml", "pending/scratch") else "wb") as f:
        expect_errno(errno.EFBIG, os.truncate, path, 100 << 30)
        expect_errno(errno.EFBIG, os.ftruncate, f.fileno(), 1 << 30)
    assert "at most" in user_error(path)
    assert peak_memory_mib(demo) < 512
    assert "<name>test</name>" in (domains / "test" / "xml").read_text()
    assert (domains / "test" / "state").read_text() == "running\n"
