"""A second hypervisor in one mount: LXC (lxc:///system) beside QEMU, served by the testbed's
libvirtd (contrib/qemu-testbed.sh installs libvirt-daemon-driver-lxc).

Containers are defined, browsed, edited through `xml` and undefined on every machine.
Starting one needs a cgroup layout libvirt's LXC driver can work with; where the machine
lacks it (see `start_blocker`), only the start is skipped, with the reason."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from conftest import Mounted, eventually, expect_errno, info, run, sh, user_error, write_file

pytestmark = pytest.mark.qemu

CONTAINER = """<domain type='lxc'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type>exe</type><init>/bin/sh</init></os>
  <devices><console type='pty'/></devices>
</domain>
"""

LXC_DRIVER = Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_lxc.so")
LIBVIRTD_PIDFILES = (Path("/run/libvirtfs-testbed/libvirtd.pid"), Path("/run/libvirtd.pid"))


def _started_before_driver_was_installed() -> bool:
    """Whether the running libvirtd predates libvirt_driver_lxc.so: it loads its drivers
    once, at start, so installing the package does not reach it until it restarts."""
    if not LXC_DRIVER.exists():
        return False
    for pidfile in LIBVIRTD_PIDFILES:
        with contextlib.suppress(OSError, ValueError):
            return _process_start(int(pidfile.read_text())) < LXC_DRIVER.stat().st_ctime
    return False


def _process_start(pid: int) -> float:
    """When process `pid` started, in seconds since the epoch (proc(5): starttime)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="session")
def lxc_uri(qemu_uri: str) -> str:
    """lxc:///system of the testbed's libvirtd (LIBVIRTFS_LXC_URI overrides it)."""
    uri = os.environ.get("LIBVIRTFS_LXC_URI", "lxc:///system")
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError as e:
        if _started_before_driver_was_installed():
            pytest.skip(f"{uri}: {e.get_error_message()}: the running libvirtd started before "
                        f"libvirt-daemon-driver-lxc was installed; restart it "
                        f"(contrib/qemu-testbed.sh stop; contrib/qemu-testbed.sh start)")
        pytest.fail(f"{uri} cannot be opened: {e.get_error_message()} (contrib/qemu-testbed.sh "
                    f"install puts libvirt-daemon-driver-lxc in place)")
    return uri


@pytest.fixture
def container(lxc_uri: str) -> Iterator[str]:
    """A fresh container name (the branch prefix `lxc-`), removed from libvirt after."""
    name = f"lxc-{os.urandom(4).hex()}"
    yield name
    run("virsh", "-c", lxc_uri, "destroy", name, check=False)
    run("virsh", "-c", lxc_uri, "undefine", name, check=False)


@pytest.fixture
def both(mount_factory, qemu_uri: str, lxc_uri: str) -> Mounted:
    """`libvirtfs qemu=qemu:///system lxc=lxc:///system MNT`"""
    return mount_factory(f"qemu={qemu_uri}", f"lxc={lxc_uri}")


def virsh(uri: str, *args: str) -> str:
    return run("virsh", "-c", uri, *args).stdout


def test_two_hypervisors_in_one_mount(both: Mounted, qemu_uri: str, lxc_uri: str) -> None:
    assert sorted(os.listdir(both.path / "hosts")) == ["lxc", "qemu"]
    assert (both.host("lxc") / "uri").read_text() == f"{lxc_uri}\n"
    assert info(both.host("lxc") / "info")["hypervisor"] == "LXC"
    assert info(both.host("qemu") / "info")["hypervisor"] == "QEMU"
    # Each host answers for its own driver: containers run `exe`, QEMU guests `hvm`.
    assert "<os_type>exe</os_type>" in (both.host("lxc") / "capabilities.xml").read_text()
    assert "<os_type>hvm</os_type>" in (both.host("qemu") / "capabilities.xml").read_text()
    listed = set(os.listdir(both.host("lxc") / "domains"))
    assert listed == set(virsh(lxc_uri, "list", "--all", "--name").split())


def test_container_define_browse_edit_undefine(both: Mounted, lxc_uri: str, qemu_uri: str,
                                               container: str) -> None:
    domains = both.host("lxc") / "domains"
    folder = domains / container
    folder.mkdir()
    document = CONTAINER.format(name=container)
    sh(f"cat > {folder / 'xml'} <<'EOF'\n{document}EOF")
    assert container in virsh(lxc_uri, "list", "--all", "--name").split()
    assert container not in os.listdir(both.host("qemu") / "domains")

    # Browse: what virsh says about it, file by file.
    assert sorted(os.listdir(folder)) == ["autostart", "control", "disks", "info", "job",
                                          "live.xml", "snapshots", "state", "xml"]
    assert (folder / "state").read_text() == "shutoff\n"
    facts = info(folder / "info")
    assert (facts["name"], facts["id"], facts["persistent"]) == (container, "-", "yes")
    assert facts["uuid"] == virsh(lxc_uri, "domuuid", container).strip()
    assert facts["memory"] == "65536"
    assert (folder / "autostart").read_text() == "0\n"
    words = (folder / "control").read_text().split()
    assert "start" in words
    assert "migrate" not in words  # libvirt's LXC driver migrates nothing
    assert (folder / "xml").read_text() == document  # the bytes written, as on QEMU
    live = (folder / "live.xml").read_text()
    assert "<domain type='lxc'>" in live
    assert "<emulator>/usr/lib/libvirt/libvirt_lxc</emulator>" in live
    assert "<init>/bin/sh</init>" in live
    # LXC keeps no snapshots: the folder is empty, and making one says why.
    assert os.listdir(folder / "snapshots") == []
    expect_errno(errno.EOPNOTSUPP, (folder / "snapshots" / "s1").mkdir)
    assert "not supported" in user_error(folder / "snapshots")
    assert os.listdir(folder / "snapshots") == []
    found = run("find", both.host("lxc"))  # the whole host, without an error
    assert f"{folder}/live.xml" in found.stdout.splitlines()

    # Edit: sed -i on xml redefines the container.
    sh(f"sed -i 's/64/96/' {folder / 'xml'}")
    assert "<memory unit='MiB'>96</memory>" in (folder / "xml").read_text()
    eventually(lambda: _assert(info(folder / "info")["max-memory"] == "98304"))
    assert "<memory unit='KiB'>98304</memory>" in virsh(lxc_uri, "dumpxml", "--inactive",
                                                        container)
    # A document libvirt refuses leaves the container as it was, with libvirt's reason.
    with pytest.raises(OSError) as caught:
        write_file(folder / "xml", document.replace("<init>/bin/sh</init>", ""))
    assert caught.value.errno in (errno.EINVAL, errno.EOPNOTSUPP), caught.value
    assert "init" in user_error(folder / "xml")
    assert "<init>/bin/sh</init>" in virsh(lxc_uri, "dumpxml", "--inactive", container)
    # A container's document does not define a QEMU guest, nor the other way round.
    wrong = both.host("qemu") / "domains" / container
    wrong.mkdir()
    with pytest.raises(OSError):
        write_file(wrong / "xml", document)
    wrong.rmdir()
    assert container not in virsh(qemu_uri, "list", "--all", "--name").split()

    # Undefine: rmdir, as on QEMU.
    folder.rmdir()
    assert container not in os.listdir(domains)
    assert container not in virsh(lxc_uri, "list", "--all", "--name").split()


def _assert(condition: bool) -> None:
    assert condition


# -- starting a container ---------------------------------------------------------------

def start_blocker() -> str | None:
    """Why libvirt 9's LXC driver cannot start a container with this machine's cgroups,
    or None.  (Read in our mount namespace, which lxc:///system's libvirtd shares.)

    - Hybrid layout (cgroup v1 controllers, plus cgroup2 on /sys/fs/cgroup/unified):
      libvirt drives both, and libvirt_lxc bind-mounts the v2 hierarchy inside the
      container before it mounts the v1 tmpfs over /sys/fs/cgroup, into a fresh sysfs
      where /sys/fs/cgroup/unified cannot be made ("Unable to create directory
      /sys/fs/cgroup/unified").
    - cgroup v1 without the controllers the driver requires: cpuacct, devices, memory.
    """
    mounts = [line.split(" - ")[1].split()[0:1] + line.split()[4:5]
              for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    v1 = {point for fstype, point in mounts if fstype == "cgroup"}
    v2 = {point for fstype, point in mounts if fstype == "cgroup2"}
    hybrid = sorted(p for p in v2 if p.startswith("/sys/fs/cgroup/"))
    if v1 and hybrid:
        controllers = Path(hybrid[0], "cgroup.controllers").read_text().split()
        return (f"hybrid cgroup layout: cgroup v1 hierarchies and cgroup2 on {hybrid[0]} "
                f"(controllers: {' '.join(controllers) or 'none'}); libvirt's LXC driver "
                f"binds the cgroup2 hierarchy into the container before it mounts the v1 "
                f"tmpfs over /sys/fs/cgroup, and fails")
    if v1 and not v2:
        names = {os.path.basename(p) for p in v1}
        joined = ",".join(sorted(names))
        missing = [c for c in ("cpuacct", "devices", "memory") if c not in joined]
        if missing:
            return f"cgroup v1 without the {', '.join(missing)} controller(s) LXC needs"
    return None


def test_container_start_and_destroy(both: Mounted, lxc_uri: str, container: str) -> None:
    folder = both.host("lxc") / "domains" / container
    folder.mkdir()
    write_file(folder / "xml", CONTAINER.format(name=container))
    blocker = start_blocker()
    started = sh(f"echo start > {folder / 'control'}", check=False)
    if started.returncode:
        reason = user_error(folder / "control")
        # Only the layout found above may stop it; anything else is a failure.
        assert blocker is not None, f"start failed: {reason}"
        assert "cgroup" in reason, reason
        assert (folder / "state").read_text() == "shutoff\n"  # nothing half started
        assert virsh(lxc_uri, "domstate", container).strip() == "shut off"
        pytest.skip(f"container start skipped: {blocker}. libvirt said: {reason}")
    assert (folder / "state").read_text() == "running\n"
    facts = info(folder / "info")
    assert facts["id"] == virsh(lxc_uri, "domid", container).strip()
    assert "destroy" in (folder / "control").read_text().split()
    # A running container refuses rmdir, as a running guest does.
    expect_errno(errno.EBUSY, folder.rmdir)
    sh(f"echo destroy > {folder / 'control'}")
    assert (folder / "state").read_text() == "shutoff\n"
    folder.rmdir()
    with pytest.raises(subprocess.CalledProcessError):
        virsh(lxc_uri, "domstate", container)

