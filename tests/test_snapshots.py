"""Snapshots as folders on the test driver (issue 4): mkdir, setfattr, cat, control, rmdir.

The demo mount serves test:///default in its own process, so everything is checked
through the mount itself, the way a user would.  What the test driver cannot do
(disk-only, reuse-ext, no-metadata, metadata-only) is in test_qemu_snapshots.py.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import xattr
from conftest import Mounted, expect_errno, info, run, sh, user_error

from libvirtfs.drivers.connection import Connection
from libvirtfs.drivers.host import Host
from libvirtfs.nodes.base import Context
from libvirtfs.nodes.snapshots import SnapshotsDirectory


def attributes(path: Path) -> dict[str, str]:
    """`getfattr -d`, parsed."""
    out = run("getfattr", "-d", "--absolute-names", path).stdout
    return {k: v.strip('"') for k, v in
            (line.split("=", 1) for line in out.splitlines() if "=" in line)}




@pytest.fixture
def snaps(demo: Mounted) -> Path:
    return demo.host() / "domains" / "test" / "snapshots"


def test_mkdir_takes_a_snapshot_with_a_description(snaps: Path) -> None:
    assert os.listdir(snaps) == []
    run("setfattr", "-n", "user.description", "-v", "before the upgrade", snaps)
    run("mkdir", snaps / "s1")
    assert sorted(os.listdir(snaps)) == ["current", "s1"]
    assert sorted(os.listdir(snaps / "s1")) == ["control", "info", "state", "xml"]
    assert "<description>before the upgrade</description>" in (snaps / "s1/xml").read_text()
    assert (snaps / "s1/state").read_text() == "running\n"
    facts = info(snaps / "s1/info")
    assert facts["name"] == "s1"
    assert facts["description"] == "before the upgrade"
    assert facts["state"] == "running"
    assert facts["parent"] == ""
    assert facts["children"] == "0"
    assert facts["current"] == "yes"
    assert facts["has-metadata"] == "yes"
    assert facts["memory"] == "internal"
    assert facts["disk-vda"] == "internal"
    # The folder's mtime is the snapshot's creation time.
    assert os.stat(snaps / "s1").st_mtime == int(facts["creation-time"])
    assert os.readlink(snaps / "current") == "s1"
    assert not (snaps / "s1/parent").exists()  # a root has no parent link


def test_parent_links_current_and_children(snaps: Path) -> None:
    sh(f"cd {snaps} && mkdir a && mkdir b && mkdir c")
    assert os.readlink(snaps / "current") == "c"
    assert os.readlink(snaps / "c/parent") == "../b"
    assert os.readlink(snaps / "b/parent") == "../a"
    assert (snaps / "c/parent/parent/info").exists()
    assert info(snaps / "a/info")["children"] == "1"
    assert info(snaps / "a/info")["descendants"] == "2"
    assert info(snaps / "b/info")["current"] == "no"
    assert sh(f"cd {snaps} && readlink -f current/parent/parent").stdout.strip() == \
        str(snaps / "a")


def test_settings_are_checked_at_setfattr_and_shown_by_getfattr(snaps: Path) -> None:
    run("setfattr", "-n", "user.flags", "-v", "atomic, live,atomic", snaps)
    run("setfattr", "-n", "user.delete-flags", "-v", "children", snaps)
    run("setfattr", "-n", "user.description", "-v", "nightly", snaps)
    assert attributes(snaps) == {"user.flags": "atomic,live", "user.delete-flags": "children",
                                 "user.description": "nightly"}

    refused = run("setfattr", "-n", "user.flags", "-v", "atomic,bogus", snaps, check=False)
    assert refused.returncode and "Invalid argument" in refused.stderr
    assert "unknown flag 'bogus'" in user_error(snaps)
    assert attributes(snaps)["user.flags"] == "atomic,live"  # unchanged

    expect_errno(errno.EINVAL, xattr.setxattr, str(snaps), "user.delete-flags", b"everything")
    expect_errno(errno.EINVAL, xattr.setxattr, str(snaps), "user.template",
                 b"<domainsnapshot><name>x</name>")
    assert "malformed XML" in user_error(snaps)
    expect_errno(errno.EINVAL, xattr.setxattr, str(snaps), "user.template",
                 b"<domain><name>x</name></domain>")
    expect_errno(errno.EINVAL, xattr.setxattr, str(snaps), "user.template",
                 b'<!DOCTYPE d [<!ENTITY e "x">]><domainsnapshot>&e;</domainsnapshot>')
    # redefine changes what mkdir does; it goes only with current and validate.
    expect_errno(errno.EINVAL, xattr.setxattr, str(snaps), "user.flags", b"redefine,halt")
    expect_errno(errno.ENOTSUP, xattr.setxattr, str(snaps), "user.flag", b"live")

    # Removing an attribute (or setting it empty) returns to the default.
    run("setfattr", "-x", "user.flags", snaps)
    run("setfattr", "-n", "user.description", "-v", "", snaps)
    run("setfattr", "-x", "user.error", snaps)
    assert attributes(snaps) == {"user.delete-flags": "children"}
    assert run("getfattr", "-n", "user.flags", snaps, check=False).returncode


def test_flags_reach_libvirt(snaps: Path, demo: Mounted) -> None:
    run("setfattr", "-n", "user.flags", "-v", "halt", snaps)
    run("mkdir", snaps / "halted")
    assert (demo.host() / "domains/test/state").read_text() == "shutoff\n"
    assert (snaps / "halted/state").read_text() == "running\n"  # the state captured


def test_template_is_the_base_and_the_folder_names_it(snaps: Path) -> None:
    template = ("<domainsnapshot><name>ignored</name><description>from the template"
                "</description></domainsnapshot>")
    run("setfattr", "-n", "user.template", "-v", template, snaps)
    run("mkdir", snaps / "t1")
    assert sorted(os.listdir(snaps)) == ["current", "t1"]
    assert info(snaps / "t1/info")["description"] == "from the template"
    # user.description wins over the template's.
    run("setfattr", "-n", "user.description", "-v", "from the attribute", snaps)
    run("mkdir", snaps / "t2")
    assert info(snaps / "t2/info")["description"] == "from the attribute"


def test_refusals_create_nothing_and_say_why(snaps: Path) -> None:
    run("mkdir", snaps / "s1")
    # The kernel answers EEXIST itself for a name it can see.
    expect_errno(errno.EEXIST, os.mkdir, snaps / "s1")
    # `current` without `redefine`: libvirt refuses, and its words are in user.error.
    run("setfattr", "-n", "user.flags", "-v", "current", snaps)
    result = run("mkdir", snaps / "s2", check=False)
    assert result.returncode
    assert "s2" not in os.listdir(snaps)
    assert user_error(snaps)
    # A flag the test hypervisor lacks.
    run("setfattr", "-n", "user.flags", "-v", "disk-only", snaps)
    expect_errno(errno.EOPNOTSUPP, os.mkdir, snaps / "s2")
    assert "unsupported flags" in user_error(snaps)
    assert sorted(os.listdir(snaps)) == ["current", "s1"]
    # A success clears the message.
    run("setfattr", "-x", "user.flags", snaps)
    run("mkdir", snaps / "s2")
    assert run("getfattr", "-n", "user.error", snaps, check=False).returncode
    # `current` is the link's name; the escaped form names a snapshot `current`.
    os.rmdir(snaps / "s2")
    os.rmdir(snaps / "s1")
    assert "current" not in os.listdir(snaps)
    expect_errno(errno.EINVAL, os.mkdir, snaps / "current")
    assert "%63urrent" in user_error(snaps)
    expect_errno(errno.EINVAL, os.mkdir, os.fsencode(str(snaps)) + b"/caf\xe9")
    expect_errno(errno.EINVAL, os.mkdir, snaps / "a%2fb")  # %2F is how `/` is written
    os.mkdir(snaps / "a%2Fb")
    assert info(snaps / "a%2Fb/info")["name"] == "a/b"
    os.mkdir(snaps / "%63urrent")
    assert info(snaps / "%63urrent/info")["name"] == "current"
    assert os.readlink(snaps / "current") == "%63urrent"
    assert os.readlink(snaps / "%63urrent/parent") == "../a%2Fb"


async def test_existing_name_is_eexist_from_libvirt(tmp_path: Path) -> None:
    """Without a mount: the driver's own check, for a name the kernel has not seen."""
    xml = tmp_path / "host.xml"
    xml.write_text("<node><domain type='test'><name>alpha</name><memory>65536</memory>"
                   "<os><type>hvm</type></os></domain></node>")
    host = Host(Connection(f"test://{xml}", timeout=5), state_dir=tmp_path / "state")
    uuid = (await host.list_domains())[0][0]
    snaps = SnapshotsDirectory(Context(), host, uuid)
    await snaps.mkdir("one")
    await host.connection.call(lambda conn: conn.lookupByUUIDString(uuid).snapshotCreateXML(
        "<domainsnapshot><name>two</name></domainsnapshot>", 0))
    for name in ("one", "two"):
        with pytest.raises(OSError) as caught:
            await snaps.mkdir(name)
        assert caught.value.errno == errno.EEXIST
    assert sorted(await snaps.children(refresh=True)) == ["current", "one", "two"]


def test_rmdir_deletes_as_delete_flags_say(snaps: Path) -> None:
    sh(f"cd {snaps} && mkdir a b c && mkdir d")
    run("rmdir", snaps / "d")
    assert sorted(os.listdir(snaps)) == ["a", "b", "c", "current"]
    assert os.readlink(snaps / "current") == "c"
    # Deleting the middle one re-parents its child.
    run("rmdir", snaps / "b")
    assert os.readlink(snaps / "c/parent") == "../a"
    run("setfattr", "-n", "user.delete-flags", "-v", "children-only", snaps)
    run("rmdir", snaps / "a")
    assert sorted(os.listdir(snaps)) == ["a", "current"]
    run("mkdir", snaps / "e")
    run("setfattr", "-n", "user.delete-flags", "-v", "children", snaps)
    run("rmdir", snaps / "a")
    assert os.listdir(snaps) == []
    expect_errno(errno.ENOENT, os.rmdir, snaps / "a")


def test_revert_with_control(snaps: Path, demo: Mounted) -> None:
    state = demo.host() / "domains/test/state"
    sh(f"cd {snaps} && mkdir a && mkdir b")
    assert (snaps / "a/control").read_text().split() == [
        "revert", "revert-running", "revert-paused", "revert-force"]
    sh(f"echo revert-paused > {snaps}/a/control")
    assert state.read_text() == "paused\n"
    assert os.readlink(snaps / "current") == "a"
    sh(f"echo revert > {snaps}/b/control")
    assert state.read_text() == "running\n"
    assert os.readlink(snaps / "current") == "b"
    run("bash", "-c", f"echo destroy > {snaps}/../control")
    sh(f"echo 'revert-running force' > {snaps}/a/control")
    assert state.read_text() == "running\n"
    refused = sh(f"echo rollback > {snaps}/a/control", check=False)
    assert refused.returncode and "Invalid argument" in refused.stderr
    assert "unknown control word 'rollback'" in user_error(snaps / "a/control")


def test_writing_xml_redefines_metadata(snaps: Path) -> None:
    run("mkdir", snaps / "s1")
    sh(f"sed -i 's|<name>s1</name>|&<description>edited with sed</description>|' "
       f"{snaps}/s1/xml")
    assert info(snaps / "s1/info")["description"] == "edited with sed"
    refused = sh(f"sed -i 's|<name>s1</name>|<name>other</name>|' {snaps}/s1/xml",
                 check=False)
    assert refused.returncode
    assert "names the snapshot 'other'" in user_error(snaps / "s1/xml")


def test_redefine_restores_a_tree(snaps: Path, tmp_path: Path) -> None:
    sh(f"cd {snaps} && mkdir a && mkdir b && mkdir c")
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in "abc":
        run("cp", snaps / name / "xml", saved / f"{name}.xml")
    created = {name: os.stat(snaps / name).st_mtime for name in "abc"}
    run("setfattr", "-n", "user.delete-flags", "-v", "children", snaps)
    run("rmdir", snaps / "a")
    assert os.listdir(snaps) == []

    run("setfattr", "-n", "user.flags", "-v", "redefine", snaps)
    run("mkdir", snaps / "a")
    # Pending: only this mount shows it, empty until its xml is written.
    assert os.listdir(snaps / "a") == []
    assert "a" in os.listdir(snaps)
    run("cp", saved / "a.xml", snaps / "a/xml")
    assert sorted(os.listdir(snaps / "a")) == ["control", "info", "state", "xml"]
    for name in "bc":
        sh(f"mkdir {snaps}/{name} && cat {saved}/{name}.xml > {snaps}/{name}/xml")
    assert os.readlink(snaps / "c/parent") == "../b"
    assert {name: float(info(snaps / name / "info")["creation-time"]) for name in "abc"} == \
        created
    # The kernel keeps the attributes mkdir returned for a second (cache_timeout); after
    # that the folders show their creation time again.
    time.sleep(1.1)
    assert {name: os.stat(snaps / name).st_mtime for name in "abc"} == created
    # A pending folder goes with rmdir; a document naming another snapshot is refused.
    run("mkdir", snaps / "d")
    expect_errno(errno.EINVAL, (snaps / "d/xml").write_bytes, (saved / "a.xml").read_bytes())
    assert "d" in os.listdir(snaps)
    run("rmdir", snaps / "d")
    assert sorted(os.listdir(snaps)) == ["a", "b", "c"]

    # redefine,current marks the redefined snapshot as the current one.
    run("setfattr", "-n", "user.flags", "-v", "redefine,current", snaps)
    sh(f"cat {saved}/b.xml > {snaps}/b/xml")
    assert os.readlink(snaps / "current") == "b"


def test_ls_lt_sorts_by_creation_time(snaps: Path, demo: Mounted) -> None:
    """With redefine and a template, mkdir redefines at once: snapshots of any age."""
    domain = (demo.host() / "domains/test/xml").read_text()
    run("setfattr", "-n", "user.flags", "-v", "redefine", snaps)
    for created in (1_000_000_000, 1_300_000_000, 1_200_000_000):
        template = (f"<domainsnapshot><creationTime>{created}</creationTime>"
                    f"<state>running</state>{domain}</domainsnapshot>")
        run("setfattr", "-n", "user.template", "-v", template, snaps)
        run("mkdir", snaps / f"at{created}")
    assert sh(f"ls -t {snaps}").stdout.split() == [
        "at1300000000", "at1200000000", "at1000000000"]
    assert os.stat(snaps / "at1000000000").st_mtime == 1_000_000_000
    assert run("ls", "-lt", snaps).returncode == 0


def test_snapshot_folders_keep_their_inode_and_cannot_be_renamed(snaps: Path) -> None:
    run("mkdir", snaps / "s1")
    inode = os.stat(snaps / "s1").st_ino
    run("mkdir", snaps / "s2")
    assert os.stat(snaps / "s1").st_ino == inode
    expect_errno(errno.EPERM, os.rename, snaps / "s1", snaps / "s3")
    expect_errno(errno.EPERM, os.unlink, snaps / "current")
    expect_errno(errno.EPERM, os.unlink, snaps / "s1/info")


def test_read_only_mount_refuses_snapshots(mount_factory) -> None:
    mounted = mount_factory("test:///default", options="ro")
    snaps = mounted.host() / "domains/test/snapshots"
    expect_errno(errno.EROFS, os.mkdir, snaps / "s1")
    expect_errno(errno.EROFS, xattr.setxattr, str(snaps), "user.flags", b"live")
