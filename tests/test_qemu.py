"""The tree and the write side against a real libvirtd running QEMU (contrib/qemu-testbed.sh)."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest
import xattr
from conftest import eventually, run, sh, write_file

pytestmark = pytest.mark.qemu

GUEST = """<domain type='qemu'>
  <name>{name}</name>
  <!-- a 64 MiB guest with no OS: SeaBIOS runs forever -->
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
</domain>
"""


@pytest.fixture
def guest_name(qemu_uri: str):
    name = f"lvfs-{uuid.uuid4().hex[:8]}"
    yield name
    run("virsh", "-c", qemu_uri, "destroy", name, check=False)
    run("virsh", "-c", qemu_uri, "undefine", "--managed-save", name, check=False)




def test_read_your_writes_survives_unmount_and_a_second_mount(
        mount_factory, qemu_uri: str, guest_name: str) -> None:
    first = mount_factory(f"lab={qemu_uri}", name="first")
    folder = first.host("lab") / "domains" / guest_name
    folder.mkdir()
    document = GUEST.format(name=guest_name)
    write_file(folder / "xml", document)
    assert (folder / "xml").read_text() == document
    second = mount_factory(f"lab={qemu_uri}", name="second")
    assert (second.host("lab") / "domains" / guest_name / "xml").read_text() == document
    assert first.unmount() == 0
    third = mount_factory(f"other={qemu_uri}", name="third")
    assert (third.host("other") / "domains" / guest_name / "xml").read_text() == document
    # libvirt's own view carries no trace of it but the metadata element
    dumped = run("virsh", "-c", qemu_uri, "dumpxml", "--inactive", guest_name).stdout
    assert "libvirtfs.org/xmlns/written/1" in dumped
    assert "libvirtfs" not in (third.host("other") / "domains" / guest_name / "live.xml"
                               ).read_text()


def test_control_words_on_qemu(mount_factory, qemu_uri: str, guest_name: str) -> None:
    mounted = mount_factory(f"lab={qemu_uri}")
    folder = mounted.host("lab") / "domains" / guest_name
    folder.mkdir()
    write_file(folder / "xml", GUEST.format(name=guest_name))
    control, state = folder / "control", folder / "state"

    def say(word: str) -> None:
        sh(f"echo '{word}' > {control}")

    say("start-paused")
    assert state.read_text() == "paused\n"
    say("resume")
    assert state.read_text() == "running\n"
    for word, expected in [("suspend", "paused"), ("resume", "running"),
                           ("reset", "running"), ("managed-save", "shutoff")]:
        say(word)
        assert state.read_text() == f"{expected}\n", word
    assert "managed-save: yes" in (folder / "info").read_text()
    say("start")  # restores the saved image
    say("wait running 10")
    # A guest without an OS ignores ACPI: shutdown is sent, the wait times out.
    say("shutdown")
    with pytest.raises(OSError) as caught:
        write_file(control, "wait shutoff 1\n")
    assert caught.value.errno == errno.ETIMEDOUT
    assert "did not reach shutoff" in xattr.getxattr(str(control), "user.error").decode()
    say("destroy")
    assert state.read_text() == "shutoff\n"
    # rmdir never discards a managed save image silently...
    say("start")
    say("managed-save")
    refused = run("rmdir", folder, check=False)
    assert refused.returncode and "Device or resource busy" in refused.stderr
    assert "has a managed save image" in xattr.getxattr(str(folder.parent),
                                                       "user.error").decode()
    assert state.read_text() == "shutoff\n"
    # ...only when user.undefine-flags on domains/ says so.
    run("setfattr", "-n", "user.undefine-flags", "-v", "managed-save", folder.parent)
    run("rmdir", folder)
    assert guest_name not in os.listdir(folder.parent)
    assert run("virsh", "-c", qemu_uri, "dominfo", guest_name, check=False).returncode != 0


def test_volumes_on_a_real_pool(mount_factory, qemu_uri: str, tmp_path: Path) -> None:
    mounted = mount_factory(f"lab={qemu_uri}")
    pools = mounted.host("lab") / "pools"
    name = f"lvfs-pool-{uuid.uuid4().hex[:6]}"
    directory = tmp_path / "images"
    directory.mkdir()
    try:
        (pools / name).mkdir()
        write_file(pools / name / "xml", f"<pool type='dir'><name>{name}</name>"
                                         f"<target><path>{directory}</path></target></pool>\n")
        sh(f"echo start > {pools / name / 'control'}")
        volumes = pools / name / "volumes"
        (volumes / "disk.qcow2").mkdir()
        write_file(volumes / "disk.qcow2" / "xml",
                   "<volume><name>disk.qcow2</name><capacity unit='MiB'>16</capacity>"
                   "<target><format type='qcow2'/></target></volume>\n")
        path = (volumes / "disk.qcow2" / "path").read_text().strip()
        assert path == str(directory / "disk.qcow2")
        assert "file format: qcow2" in run("qemu-img", "info", path).stdout
        run("rmdir", volumes / "disk.qcow2")
        assert not os.path.exists(path)
        sh(f"echo stop > {pools / name / 'control'}")
        run("rmdir", pools / name)
        assert name not in os.listdir(pools)
    finally:
        run("virsh", "-c", qemu_uri, "pool-destroy", name, check=False)
        run("virsh", "-c", qemu_uri, "pool-undefine", name, check=False)


def test_a_password_survives_editing_without_being_shown(
        mount_factory, qemu_uri: str, guest_name: str) -> None:
    mounted = mount_factory(f"lab={qemu_uri}")
    folder = mounted.host("lab") / "domains" / guest_name
    folder.mkdir()
    guest = GUEST.format(name=guest_name).replace(
        "</os>", "</os>\n  <devices><graphics type='vnc' autoport='yes' listen='127.0.0.1'"
                 " passwd='s3cret'/></devices>")
    write_file(folder / "xml", guest)
    assert "s3cret" not in (folder / "xml").read_text()
    run("sed", "-i", "s/65536/98304/g", folder / "xml")  # edit libvirt's text, write it back
    assert "memory: 98304" in (folder / "info").read_text()
    secure = run("virsh", "-c", qemu_uri, "dumpxml", "--inactive", "--security-info",
                 guest_name).stdout
    assert "passwd='s3cret'" in secure


def test_libvirt_events_refresh_the_tree_before_the_cache_runs_out(
        mount_factory, qemu_uri: str, guest_name: str) -> None:
    # With an hour-long cache, only libvirt's events can tell the mount about changes.
    mounted = mount_factory(f"lab={qemu_uri}", options="cache_timeout=3600")
    domains = mounted.host("lab") / "domains"
    assert guest_name not in os.listdir(domains)
    guest = Path(mounted.path.parent / "guest.xml")
    guest.write_text(GUEST.format(name=guest_name))
    run("virsh", "-c", qemu_uri, "define", guest)
    eventually(lambda: _assert(guest_name in os.listdir(domains)), timeout=3)
    state = domains / guest_name / "state"
    assert state.read_text() == "shutoff\n"
    run("virsh", "-c", qemu_uri, "start", guest_name)
    eventually(lambda: _assert(state.read_text() == "running\n"), timeout=3)
    run("virsh", "-c", qemu_uri, "suspend", guest_name)
    eventually(lambda: _assert(state.read_text() == "paused\n"), timeout=3)


def _assert(condition: bool) -> None:
    assert condition


@pytest.fixture
def second_uri(qemu_uri: str):
    """The second libvirtd, reached over libvirt's remote protocol on loopback."""
    testbed = Path(__file__).resolve().parent.parent / "contrib" / "qemu-testbed.sh"
    uri = run("bash", testbed, "start-second", timeout=120).stdout.strip().splitlines()[-1]
    yield uri, testbed
    run("bash", testbed, "start-second", timeout=120)  # leave it running, as found


def test_a_remote_host_that_goes_away_and_comes_back(mount_factory, second_uri) -> None:
    uri, testbed = second_uri
    mounted = mount_factory("local=test:///default", f"remote={uri}",
                            options="timeout=5,cache_timeout=0")
    remote = mounted.host("remote")
    assert (remote / "uri").read_text() == uri + "\n"
    assert "hostname: libvirtfs-second" in (remote / "info").read_text()
    run("bash", testbed, "stop-second", timeout=60)

    def unreachable() -> None:
        with pytest.raises(OSError) as caught:
            (remote / "info").read_text()
        assert caught.value.errno in (errno.ENOTCONN, errno.EIO), caught.value

    eventually(unreachable, timeout=10)
    # The other host is not held up meanwhile.
    assert (mounted.host("local") / "domains/test/state").read_text() == "running\n"
    run("bash", testbed, "start-second", timeout=120)
    eventually(lambda: _assert("hostname: libvirtfs-second"
                               in (remote / "info").read_text()), timeout=15)


def test_a_reconnected_host_shows_what_changed_while_it_was_away(
        mount_factory, second_uri) -> None:
    uri, testbed = second_uri
    # An hour-long cache: only the reconnect can make the tree true again.
    mounted = mount_factory(f"remote={uri}", options="timeout=5,cache_timeout=3600")
    domains = mounted.host("remote") / "domains"
    before = set(os.listdir(domains))
    run("bash", testbed, "stop-second", timeout=60)
    run("bash", testbed, "start-second", timeout=120)
    name = f"lvfs-{uuid.uuid4().hex[:8]}"
    guest = mounted.path.parent / "away.xml"
    guest.write_text(GUEST.format(name=name))
    run("virsh", "-c", uri, "define", guest)
    try:
        eventually(lambda: _assert(set(os.listdir(domains)) == before | {name}), timeout=15)
    finally:
        run("virsh", "-c", uri, "undefine", name, check=False)


def test_network_and_pool_writes_are_remembered_across_mounts(
        mount_factory, qemu_uri: str, tmp_path: Path) -> None:
    # libvirt 9 keeps no metadata for these: the memory is in the state folder.
    name = f"lvfs-{uuid.uuid4().hex[:6]}"
    network = (f"<network>\n  <name>{name}</name>\n  <!-- lab network -->\n"
               f"  <bridge name='lv{name[-6:]}'/>\n</network>\n")
    pool = (f"<pool type='dir'>\n  <name>{name}</name>\n"
            f"  <target><path>{tmp_path}</path></target>\n</pool>\n")
    try:
        first = mount_factory(f"lab={qemu_uri}", name="first")
        (first.host("lab") / "networks" / name).mkdir()
        write_file(first.host("lab") / "networks" / name / "xml", network)
        (first.host("lab") / "pools" / name).mkdir()
        write_file(first.host("lab") / "pools" / name / "xml", pool)
        assert first.unmount() == 0
        again = mount_factory(f"lab={qemu_uri}", name="again")
        assert (again.host("lab") / "networks" / name / "xml").read_text() == network
        assert (again.host("lab") / "pools" / name / "xml").read_text() == pool
        # A change outside the definition (autostart) leaves it remembered...
        run("virsh", "-c", qemu_uri, "net-autostart", name)
        assert (again.host("lab") / "networks" / name / "xml").read_text() == network
        # ...a new definition from elsewhere shows libvirt's text again.
        dumped = run("virsh", "-c", qemu_uri, "net-dumpxml", "--inactive", name).stdout
        (tmp_path / "net.xml").write_text(dumped.replace(f"lv{name[-6:]}", "lvother"))
        run("virsh", "-c", qemu_uri, "net-define", tmp_path / "net.xml")
        xml = again.host("lab") / "networks" / name / "xml"
        eventually(lambda: _assert("lvother" in xml.read_text()), timeout=3)
    finally:
        run("virsh", "-c", qemu_uri, "net-undefine", name, check=False)
        run("virsh", "-c", qemu_uri, "pool-undefine", name, check=False)
