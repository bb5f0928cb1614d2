"""Faults against the real libvirtd (contrib/qemu-testbed.sh): failing calls leak no
connection, and a killed libvirtd is survived without a remount."""

from __future__ import annotations

import errno
import shutil
import uuid
from collections.abc import Iterator

import libvirt
import pytest
from conftest import Mounted, run

pytestmark = pytest.mark.qemu


def libvirtd_clients_of(pid: int) -> int:
    """How many connections libvirtd serves for process `pid` (virt-admin)."""
    listing = run("virt-admin", "client-list", "libvirtd").stdout
    count = 0
    for line in listing.splitlines()[2:]:
        if not line.strip():
            continue
        info = run("virt-admin", "client-info", "libvirtd", line.split()[0], check=False).stdout
        fields = dict(part.split(":", 1) for part in info.splitlines() if ":" in part)
        if fields.get("unix_process_id", "").strip() == str(pid):
            count += 1
    return count


@pytest.fixture
def libvirt_conn(qemu_uri: str) -> Iterator[libvirt.virConnect]:
    if shutil.which("virt-admin") is None:
        pytest.skip("virt-admin is needed to count libvirtd's clients")
    conn = libvirt.open(qemu_uri)
    yield conn
    conn.close()


@pytest.fixture
def unreadable_domain(libvirt_conn: libvirt.virConnect) -> Iterator[str]:
    """A domain whose XML libvirt cannot send back: every `XMLDesc` fails with VIR_ERR_RPC
    ("Unable to encode message payload"), while the connection stays good.  Each `>` of
    the description comes back as `&gt;`, past the RPC string limit."""
    name = f"hangs-{uuid.uuid4().hex[:8]}"
    dom = libvirt_conn.defineXML(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        f"<description>{'>' * 1_500_000}</description>"
        f"<os><type arch='x86_64'>hvm</type></os></domain>")
    yield name
    dom.undefine()


def test_failing_calls_leak_no_connection(mount_factory, qemu_uri: str,
                                         unreadable_domain: str) -> None:
    mounted: Mounted = mount_factory(f"lab={qemu_uri}")
    folder = mounted.host("lab") / "domains" / unreadable_domain
    assert (folder / "state").read_text() == "shutoff\n"
    assert libvirtd_clients_of(mounted.process.pid) == 1
    for _ in range(20):
        with pytest.raises(OSError) as caught:
            (folder / "live.xml").read_text()
        assert caught.value.errno == errno.EIO
    # One message failed twenty times; the connection was never lost, nor replaced.
    assert (folder / "state").read_text() == "shutoff\n"
    assert libvirtd_clients_of(mounted.process.pid) == 1
    assert "was lost" not in mounted.log()
