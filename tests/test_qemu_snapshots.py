"""Snapshots as folders on a real libvirtd running QEMU (issue 4).

Needs the test bed: `bash contrib/qemu-testbed.sh start`, then LIBVIRTFS_QEMU_URI=qemu:///system
(contrib/test.sh does both).  Each test gets its own small guest (64 MiB, no OS, a 16 MiB
qcow2 disk) in a storage pool of its own in a temporary folder, and removes all of it
afterwards.  Everything the user does goes through the mount; virsh and qemu-img only
set up and check.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import QEMU_ONLY, QEMU_URI, Mounted, guest_xml, info, run, sh, user_error

pytestmark = QEMU_ONLY

def virsh(*args: str, check: bool = True) -> str:
    return run("virsh", "-c", QEMU_URI, *args, check=check).stdout






def image(path: Path) -> dict:
    """`qemu-img info`, sharing the image with the running guest."""
    return json.loads(run("qemu-img", "info", "-U", "--output=json", path).stdout)


def internal_snapshots(path: Path) -> list[str]:
    return [s["name"] for s in image(path).get("snapshots", [])]


def live_disk(folder: Path) -> str:
    """The file the guest's vda is backed by now, as live.xml says."""
    text = (folder / "live.xml").read_text()
    disk = text[text.index("<disk "):text.index("</disk>")]
    return disk.split("<source file='", 1)[1].split("'", 1)[0]


@dataclass
class Guest:
    name: str
    pool: Path
    disk: Path
    mount: Mounted

    @property
    def folder(self) -> Path:
        return self.mount.host("lab") / "domains" / self.name

    @property
    def snaps(self) -> Path:
        return self.folder / "snapshots"

    def state(self) -> str:
        return (self.folder / "state").read_text().strip()

    def flags(self, value: str) -> None:
        run("setfattr", "-n", "user.flags", "-v", value, self.snaps)


@pytest.fixture
def guest(mount_factory, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Guest]:
    """A running guest, its pool, and a mount of the QEMU host at hosts/lab."""
    name = f"lvfs-{request.node.name[5:25].replace('_', '-')}-{uuid.uuid4().hex[:6]}"
    pool = tmp_path / "pool"
    pool.mkdir()
    virsh("pool-create-as", name, "dir", "--target", str(pool))
    try:
        virsh("vol-create-as", name, "disk.qcow2", "16M", "--format", "qcow2")
        disk = pool / "disk.qcow2"
        (tmp_path / "domain.xml").write_text(guest_xml(name, disk))
        virsh("define", str(tmp_path / "domain.xml"))
        virsh("start", name)
        yield Guest(name, pool, disk, mount_factory(f"lab={QEMU_URI}"))
    finally:
        virsh("destroy", name, check=False)
        virsh("undefine", name, "--snapshots-metadata", "--managed-save", check=False)
        virsh("pool-destroy", name, check=False)


def test_internal_snapshot_of_a_running_domain(guest: Guest) -> None:
    run("setfattr", "-n", "user.description", "-v", "memory and disk", guest.snaps)
    run("mkdir", guest.snaps / "s1")
    assert sorted(os.listdir(guest.snaps)) == ["current", "s1"]
    facts = info(guest.snaps / "s1/info")
    assert facts["state"] == "running"
    assert facts["memory"] == "internal"
    assert facts["disk-vda"] == "internal"
    assert facts["description"] == "memory and disk"
    assert facts["current"] == "yes"
    assert (guest.snaps / "s1/state").read_text() == "running\n"
    assert os.stat(guest.snaps / "s1").st_mtime == int(facts["creation-time"])
    assert "<memory snapshot='internal'/>" in (guest.snaps / "s1/xml").read_text()
    assert internal_snapshots(guest.disk) == ["s1"]
    assert guest.state() == "running"


def test_disk_only_external_atomic_libvirt_makes_the_overlay(guest: Guest) -> None:
    overlay = guest.pool / "ext1.qcow2"
    guest.flags("disk-only,atomic")
    run("setfattr", "-n", "user.template", "-v",
        f"<domainsnapshot><disks><disk name='vda' snapshot='external'>"
        f"<source file='{overlay}'/></disk></disks></domainsnapshot>", guest.snaps)
    run("mkdir", guest.snaps / "ext1")
    facts = info(guest.snaps / "ext1/info")
    assert facts["state"] == "disk-snapshot"
    assert facts["memory"] == "no"
    assert facts["disk-vda"] == f"external {overlay}"
    # Without reuse-ext, libvirt creates the overlay, naming its backing file absolutely.
    assert image(overlay)["backing-filename"] == str(guest.disk)
    assert live_disk(guest.folder) == str(overlay)
    # Without a template, libvirt chooses the overlay's name beside the disk.  (The flags
    # were used up by the snapshot they made.)
    run("setfattr", "-x", "user.template", guest.snaps)
    guest.flags("disk-only,atomic")
    run("mkdir", guest.snaps / "ext2")
    assert info(guest.snaps / "ext2/info")["disk-vda"].startswith(f"external {guest.pool}/")
    assert os.readlink(guest.snaps / "ext2/parent") == "../ext1"
    assert guest.state() == "running"


def test_reuse_ext_keeps_a_relative_backing_file_name(guest: Guest) -> None:
    """The case this project was born from: a pre-made overlay with a relative backing
    name is used as it is (QEMU's `existing` mode), not truncated nor rewritten."""
    overlay = guest.pool / "overlay.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", "disk.qcow2",
        "overlay.qcow2", cwd=guest.pool)
    assert image(overlay)["backing-filename"] == "disk.qcow2"
    guest.flags("disk-only,reuse-ext,atomic")
    run("setfattr", "-n", "user.template", "-v",
        f"<domainsnapshot><disks><disk name='vda' snapshot='external'>"
        f"<driver type='qcow2'/><source file='{overlay}'/></disk></disks></domainsnapshot>",
        guest.snaps)
    assert sh(f"getfattr -d {guest.snaps}").stdout.count("user.") == 2
    run("mkdir", guest.snaps / "reused")
    assert image(overlay)["backing-filename"] == "disk.qcow2"  # still relative
    assert live_disk(guest.folder) == str(overlay)             # the guest writes there
    assert info(guest.snaps / "reused/info")["disk-vda"] == f"external {overlay}"
    assert guest.state() == "running"

    # reuse-ext with an overlay that is not there: libvirt refuses, nothing is made.
    guest.flags("disk-only,reuse-ext,atomic")
    run("setfattr", "-n", "user.template", "-v",
        f"<domainsnapshot><disks><disk name='vda' snapshot='external'>"
        f"<source file='{guest.pool}/missing.qcow2'/></disk></disks></domainsnapshot>",
        guest.snaps)
    with pytest.raises(OSError) as caught:
        os.mkdir(guest.snaps / "nothing")
    assert caught.value.errno == errno.ENOENT
    assert "missing.qcow2" in user_error(guest.snaps)
    assert "nothing" not in os.listdir(guest.snaps)
    assert not (guest.pool / "missing.qcow2").exists()


def test_refusals_leave_nothing_behind(guest: Guest) -> None:
    guest.flags("quiesce")
    with pytest.raises(OSError) as caught:
        os.mkdir(guest.snaps / "q")
    assert caught.value.errno == errno.EINVAL
    assert "VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY" in user_error(guest.snaps)
    guest.flags("quiesce,disk-only")
    with pytest.raises(OSError) as caught:
        os.mkdir(guest.snaps / "q")
    assert caught.value.errno == errno.EOPNOTSUPP
    assert "guest agent" in user_error(guest.snaps)
    assert os.listdir(guest.snaps) == []
    assert internal_snapshots(guest.disk) == []
    assert sorted(p.name for p in guest.pool.iterdir()) == ["disk.qcow2"]
    run("setfattr", "-x", "user.flags", guest.snaps)
    run("mkdir", guest.snaps / "ok")
    with pytest.raises(OSError) as caught:
        os.mkdir(guest.snaps / "ok")
    assert caught.value.errno == errno.EEXIST
    # A domain that cannot do it now: a shut-off domain has no memory to save.
    sh(f"echo destroy > {guest.folder}/control")
    run("setfattr", "-n", "user.template", "-v",
        f"<domainsnapshot><memory snapshot='external' file='{guest.pool}/memory'/>"
        f"</domainsnapshot>", guest.snaps)
    with pytest.raises(OSError) as caught:
        os.mkdir(guest.snaps / "memory")
    assert caught.value.errno == errno.EINVAL
    assert "memory state cannot be saved" in user_error(guest.snaps)
    assert sorted(os.listdir(guest.snaps)) == ["current", "ok"]
    assert not (guest.pool / "memory").exists()


def test_halt_shuts_the_domain_off(guest: Guest) -> None:
    guest.flags("halt")
    run("mkdir", guest.snaps / "halted")
    assert guest.state() == "shutoff"
    assert (guest.snaps / "halted/state").read_text() == "running\n"
    assert info(guest.snaps / "halted/info")["memory"] == "internal"


def test_no_metadata_leaves_no_folder(guest: Guest) -> None:
    guest.flags("no-metadata")
    run("mkdir", guest.snaps / "ghost")
    assert os.listdir(guest.snaps) == []
    assert virsh("snapshot-list", guest.name, "--name").strip() == ""
    # The snapshot itself was taken: it is in the disk image.
    assert internal_snapshots(guest.disk) == ["ghost"]


def test_chain_of_three_then_delete_with_children(guest: Guest) -> None:
    for name in ("a", "b", "c"):
        run("mkdir", guest.snaps / name)
    assert os.readlink(guest.snaps / "c/parent") == "../b"
    assert os.readlink(guest.snaps / "b/parent") == "../a"
    assert not os.path.lexists(guest.snaps / "a/parent")
    assert os.readlink(guest.snaps / "current") == "c"
    assert info(guest.snaps / "a/info")["descendants"] == "2"
    assert sh(f"ls -t {guest.snaps}").returncode == 0
    run("setfattr", "-n", "user.delete-flags", "-v", "children", guest.snaps)
    run("rmdir", guest.snaps / "a")
    assert os.listdir(guest.snaps) == []
    assert internal_snapshots(guest.disk) == []
    assert virsh("snapshot-list", guest.name, "--name").strip() == ""


def test_revert_to_the_middle_one_while_running(guest: Guest) -> None:
    for name in ("a", "b", "c"):
        run("mkdir", guest.snaps / name)
    sh(f"echo revert > {guest.snaps}/b/control")
    assert os.readlink(guest.snaps / "current") == "b"
    assert info(guest.snaps / "b/info")["current"] == "yes"
    assert guest.state() == "running"
    assert info(guest.folder / "info")["reason"] == "from-snapshot"
    sh(f"echo revert-paused > {guest.snaps}/a/control")
    assert guest.state() == "paused"
    assert os.readlink(guest.snaps / "current") == "a"
    sh(f"echo revert-running > {guest.snaps}/c/control")
    assert guest.state() == "running"
    assert sorted(os.listdir(guest.snaps)) == ["a", "b", "c", "current"]


def test_redefine_after_undefine_and_define(guest: Guest, tmp_path: Path) -> None:
    """Save the metadata, undefine the domain, define it again, restore the tree."""
    for name in ("a", "b"):
        run("mkdir", guest.snaps / name)
    saved = tmp_path / "saved"
    saved.mkdir()
    run("cp", guest.folder / "xml", saved / "domain.xml")
    for name in ("a", "b"):
        run("cp", guest.snaps / name / "xml", saved / f"{name}.xml")
    # Drop the metadata only: the snapshots stay in the disk image.
    run("setfattr", "-n", "user.delete-flags", "-v", "children,metadata-only", guest.snaps)
    run("rmdir", guest.snaps / "a")
    assert os.listdir(guest.snaps) == []
    assert internal_snapshots(guest.disk) == ["a", "b"]
    sh(f"echo destroy > {guest.folder}/control")
    domains = guest.folder.parent
    run("rmdir", guest.folder)
    assert guest.name not in os.listdir(domains)

    run("mkdir", guest.folder)
    run("cp", saved / "domain.xml", guest.folder / "xml")
    assert guest.state() == "shutoff"
    guest.flags("redefine")
    for name in ("a", "b"):
        run("mkdir", guest.snaps / name)
        assert os.listdir(guest.snaps / name) == []  # pending: empty until xml is written
        run("cp", saved / f"{name}.xml", guest.snaps / name / "xml")
    assert os.readlink(guest.snaps / "b/parent") == "../a"
    assert info(guest.snaps / "b/info")["state"] == "running"
    # The redefined metadata is enough to go back to the guest's running state.
    sh(f"echo revert > {guest.snaps}/b/control")
    assert guest.state() == "running"
    assert os.readlink(guest.snaps / "current") == "b"


def test_the_docs_live_snapshot_with_its_memory_in_a_file(guest: Guest) -> None:
    """docs/snapshots.md's worked session, its `live` part, typed as written on a running
    QEMU guest (the memory file in the guest's pool rather than /var/lib/libvirt/images):
    QEMU takes `live` only with the memory saved to a file of its own."""
    memory = guest.pool / "test.mem"
    template = (f"<domainsnapshot><memory snapshot='external' file='{memory}'/>"
                f"</domainsnapshot>")

    def typed(line: str) -> str:
        done = sh(line, cwd=guest.snaps, check=False)
        assert done.returncode == 0, (line, done.stderr, sh("getfattr -n user.error .",
                                                            cwd=guest.snaps, check=False))
        return done.stdout

    typed('setfattr -n user.description -v "before the upgrade" .')
    typed("mkdir before-upgrade")
    assert info(guest.snaps / "before-upgrade/info")["memory"] == "internal"
    typed("setfattr -n user.flags -v atomic,live .")
    typed(f'setfattr -n user.template -v "{template}" .')
    typed("setfattr -x user.description .")
    assert typed("getfattr -d .") == (f'# file: .\nuser.flags="atomic,live"\n'
                                      f'user.template="{template}"\n\n')
    typed("mkdir after-upgrade")           # uses the flags up; the template stays
    assert typed("getfattr -d .") == f'# file: .\nuser.template="{template}"\n\n'
    typed("setfattr -x user.template .")
    assert typed("readlink current after-upgrade/parent") == \
        "after-upgrade\n../before-upgrade\n"

    # What it made: the memory in its file, the disk in a new overlay, the guest running.
    facts = info(guest.snaps / "after-upgrade/info")
    assert (facts["state"], facts["memory"]) == ("running", f"external {memory}")
    assert facts["disk-vda"] == f"external {guest.pool}/disk.after-upgrade", facts
    assert memory.stat().st_size > 0
    assert live_disk(guest.folder) == facts["disk-vda"].split(" ", 1)[1]
    assert guest.state() == "running"

    # Without a memory file of its own, QEMU refuses `live`, and nothing is made.
    typed("setfattr -n user.flags -v atomic,live .")
    refused = sh("mkdir nope", cwd=guest.snaps, check=False)
    assert refused.returncode, refused
    assert "Operation not supported" in refused.stderr  # EOPNOTSUPP
    assert "supported only during full system snapshots" in user_error(guest.snaps)
    assert sorted(os.listdir(guest.snaps)) == ["after-upgrade", "before-upgrade", "current"]
