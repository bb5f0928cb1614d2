"""Restoring a saved object folder with ordinary tools defines the object from its `xml`
(issue 7), and no file a tool creates can hide a served one (`control`, `state`, ...).

A pending folder (made by mkdir) is empty until a writer creates its `xml`, so tools that
create with O_EXCL (cp -r, tar, install) can; the other saved files (`state`, `control`,
...) cannot be written back and are refused, each with a clear error.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import Mounted, expect_errno, info, run, sh, user_error, write_file

WEB = """<domain type='test'>
  <name>web</name>
  <!-- saved with cp -r -->
  <memory unit='KiB'>131072</memory>
  <os><type>hvm</type></os>
</domain>
"""
SERVED = ["autostart", "control", "disks", "info", "job", "live.xml", "snapshots", "state",
          "xml"]


@pytest.fixture
def domains(demo: Mounted) -> Path:
    return demo.host() / "domains"


@pytest.fixture
def saved(domains: Path, tmp_path: Path) -> Path:
    """`cp -r domains/web saved/` of a domain, which is then removed."""
    os.mkdir(domains / "web")
    write_file(domains / "web" / "xml", WEB)
    (tmp_path / "saved").mkdir()
    run("cp", "-r", domains / "web", tmp_path / "saved")
    run("rmdir", domains / "web")
    assert os.listdir(domains) == ["test"]
    return tmp_path / "saved" / "web"


def restored(web: Path) -> None:
    """Defined from the saved xml, its served files served."""
    assert (web / "xml").read_text() == WEB
    assert (web / "state").read_text() == "shutoff\n"
    assert sorted(os.listdir(web)) == SERVED
    assert (web / "control").read_text() == "start\nstart-paused\nwait\n"
    sh(f"echo start > {web / 'control'}")
    assert (web / "state").read_text() == "running\n"


def test_a_pending_folder_is_empty_until_its_xml_is_created(domains: Path) -> None:
    os.mkdir(domains / "web")
    assert os.listdir(domains / "web") == []
    expect_errno(errno.ENOENT, (domains / "web" / "xml").read_text)
    run("install", "-m", "644", "/dev/null", domains / "web" / "xml")  # empty: nothing yet
    assert os.listdir(domains / "web") == ["xml"]
    assert (domains / "web" / "state").exists() is False


def test_cp_r_restores_a_saved_folder(saved: Path, domains: Path) -> None:
    result = run("cp", "-r", saved, domains, check=False)
    # The files that cannot be written back are refused, each with its reason...
    assert result.returncode == 1
    assert "control" in result.stderr and "state" in result.stderr
    assert "xml" not in result.stderr.replace("live.xml", "")
    # ...and the domain is defined from its xml.
    restored(domains / "web")


@pytest.mark.parametrize("restore", [
    "cp -a {saved} {domains}/",
    "mkdir {domains}/web && cp -r {saved}/. {domains}/web/",
    "tar -C {saved}/.. -cf {tmp}/web.tar web && tar -C {domains} -xf {tmp}/web.tar",
    "rsync -a {saved} {domains}/",
    "mkdir {domains}/web && rsync -rt {saved}/ {domains}/web/",
    "mkdir {domains}/web && install -m 644 {saved}/xml {domains}/web/xml",
])
def test_tools_restore_a_saved_folder(saved: Path, domains: Path, tmp_path: Path,
                                      restore: str) -> None:
    sh(restore.format(saved=saved, domains=domains, tmp=tmp_path), check=False)
    restored(domains / "web")


def test_a_copied_control_file_never_hides_the_served_one(saved: Path,
                                                           domains: Path) -> None:
    web = domains / "web"
    os.mkdir(web)
    result = run("cp", saved / "control", web / "control", check=False)
    assert result.returncode and "Operation not permitted" in result.stderr
    assert "write its xml first" in user_error(web)
    result = run("cp", saved / "state", web / "state", check=False)
    assert result.returncode
    run("cp", saved / "xml", web / "xml")
    # control is libvirtfs's: words written to it are carried out.
    sh(f"echo start > {web / 'control'}")
    assert (web / "state").read_text() == "running\n"
    sh(f"echo destroy > {web / 'control'}")
    assert info(web / "info")["state"] == "shutoff"


def test_scratch_files_cannot_take_a_served_name(saved: Path, domains: Path) -> None:
    web = domains / "web"
    os.mkdir(web)
    write_file(web / "notes", "mine")
    expect_errno(errno.EPERM, os.rename, web / "notes", web / "control")
    expect_errno(errno.EPERM, os.rename, web / "notes", web / "snapshots")
    expect_errno(errno.EPERM, write_file, web / "state", "running\n")
    # A scratch file renamed onto xml is the definition (rsync, Ansible, mv new.xml xml).
    write_file(web / "new.xml", WEB)
    os.rename(web / "new.xml", web / "xml")
    assert sorted(os.listdir(web)) == sorted([*SERVED, "notes"])
    assert (web / "control").read_text() == "start\nstart-paused\nwait\n"
    expect_errno(errno.EPERM, os.rename, web / "notes", web / "control")
    expect_errno(errno.EEXIST, os.open, web / "info", os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def test_a_refused_xml_leaves_the_folder_pending(domains: Path, tmp_path: Path) -> None:
    web = domains / "web"
    os.mkdir(web)
    write_file(web / "bad.xml", "<domain>")
    expect_errno(errno.EINVAL, os.rename, web / "bad.xml", web / "xml")
    assert os.listdir(web) == ["bad.xml"]
    assert "malformed" in user_error(web)


NETWORK = """<network>
  <name>lab</name>
  <bridge name='virbr9'/>
</network>
"""


def test_a_saved_control_file_copied_back_does_nothing(demo: Mounted, tmp_path: Path) -> None:
    """A stopped network's `control` lists one word, `start`: copied back over the folder,
    it must not start the network."""
    lab = demo.host() / "networks" / "lab"
    os.mkdir(lab)
    write_file(lab / "xml", NETWORK)
    run("cp", "-r", lab, tmp_path / "saved")
    assert (tmp_path / "saved" / "control").read_text() == "start\nwait\n"
    result = run("cp", "-r", f"{tmp_path / 'saved'}/.", f"{lab}/", check=False)
    assert (lab / "state").read_text() == "inactive\n"
    assert result.returncode and "control" in result.stderr
    assert "cp copies files" in user_error(lab / "control")
    run("tar", "-C", tmp_path / "saved", "-cf", tmp_path / "lab.tar", "control")
    sh(f"tar -C {lab} --overwrite -xf {tmp_path / 'lab.tar'}", check=False)
    assert (lab / "state").read_text() == "inactive\n"
    sh(f"echo start > {lab / 'control'}")  # words written on purpose still work
    assert (lab / "state").read_text() == "active\n"


def test_cp_r_of_saved_snapshot_folders_redefines_them(demo: Mounted, tmp_path: Path) -> None:
    """A folder that cp, tar or rsync makes in snapshots/ waits for its saved xml, which
    redefines the snapshot: it does not take a new one of the domain as it is now."""
    snaps = demo.host() / "domains" / "test" / "snapshots"
    sh(f"cd {snaps} && mkdir s1 && mkdir s2 && mkdir s3")
    saved = tmp_path / "saved"
    saved.mkdir()
    run("cp", "-r", snaps / "s1", snaps / "s2", snaps / "s3", saved)
    created = {name: info(snaps / name / "info")["creation-time"] for name in ("s1", "s2")}
    for name in ("s3", "s2", "s1"):
        run("rmdir", snaps / name)
    assert os.listdir(snaps) == []
    run("setfattr", "-n", "user.flags", "-v", "halt", snaps)  # not used by a restore

    result = run("cp", "-r", saved / "s1", saved / "s2", snaps, check=False)
    assert result.returncode  # state, info, control and the parent link are not copied
    assert sorted(os.listdir(snaps)) == ["s1", "s2"]
    assert {name: info(snaps / name / "info")["creation-time"] for name in ("s1", "s2")} \
        == created
    assert os.readlink(snaps / "s2" / "parent") == "../s1"
    assert (demo.host() / "domains" / "test" / "state").read_text() == "running\n"
    sh(f"rsync -a {saved / 's3'} {snaps}/", check=False)
    assert sorted(os.listdir(snaps)) == ["s1", "s2", "s3"]
    assert os.readlink(snaps / "s3" / "parent") == "../s2"
