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
from conftest import Mounted, expect_errno, user_error


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
