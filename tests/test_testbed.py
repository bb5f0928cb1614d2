"""contrib/qemu-testbed.sh and contrib/test.sh leave the machine's qemu.conf as they found
it, and say first what they change.  install and stop run here on a qemu.conf of the
test's own (LIBVIRTFS_TESTBED_QEMU_CONF), with pid files and state of its own, so the
shared daemons keep running."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import REPO, run

TESTBED = REPO / "contrib/qemu-testbed.sh"

pytestmark = pytest.mark.qemu  # install needs the test bed's packages in place

ORIGINAL = """# A site's qemu.conf
user = "libvirt-qemu"
#security_driver = "selinux"
migration_address = "10.0.0.5"
max_processes = 100
"""


def run_testbed(tmp_path: Path, command: str) -> str:
    env = dict(os.environ, LIBVIRTFS_TESTBED_QEMU_CONF=str(tmp_path / "qemu.conf"),
               LIBVIRTFS_TESTBED_STATE=str(tmp_path / "state"),
               LIBVIRTFS_TESTBED_RUN=str(tmp_path / "run"))
    result = run("env", *[f"{k}={v}" for k, v in env.items()], "bash", TESTBED, command,
                 timeout=300)
    return result.stderr


def test_stop_puts_qemu_conf_back_as_it_was(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text(ORIGINAL)
    os.chmod(conf, 0o600)
    run_testbed(tmp_path, "install")
    changed = conf.read_text()
    assert 'user = "root"' in changed and 'security_driver = "none"' in changed
    assert '#migration_address = "10.0.0.5"' in changed
    run_testbed(tmp_path, "install")  # every start installs again: the original is kept
    assert "put " + str(conf) + " back" in run_testbed(tmp_path, "stop")
    assert conf.read_text() == ORIGINAL
    assert conf.stat().st_mode & 0o777 == 0o600
    assert run_testbed(tmp_path, "stop") == ""  # nothing left to put back


def test_a_qemu_conf_that_was_not_there_is_removed_again(tmp_path: Path) -> None:
    run_testbed(tmp_path, "install")
    assert 'user = "root"' in (tmp_path / "qemu.conf").read_text()
    run_testbed(tmp_path, "stop")
    assert not (tmp_path / "qemu.conf").exists()


def test_a_qemu_conf_changed_meanwhile_is_left_alone(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text(ORIGINAL)
    run_testbed(tmp_path, "install")
    conf.write_text(conf.read_text() + "max_files = 2048\n")  # the administrator's edit
    edited = conf.read_text()
    said = run_testbed(tmp_path, "stop")
    assert conf.read_text() == edited
    assert "changed since install set it; left as it is" in said
    assert (tmp_path / "state/qemu.conf.original").read_text() == ORIGINAL


def test_test_sh_says_what_it_changes_before_it_starts() -> None:
    text = (REPO / "contrib/test.sh").read_text()
    assert text.index("qemu-testbed.sh changes") < text.index("qemu-testbed.sh start")
    said = run("bash", TESTBED, "changes").stdout
    assert "qemu.conf" in said and "puts the\n    file back" in said
    assert "UNAUTHENTICATED" in said and "127.0.0.1:16510" in said
