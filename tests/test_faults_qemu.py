"""Faults against the real libvirtd (contrib/qemu-testbed.sh): failing calls leak no
connection, and a killed libvirtd is survived without a remount."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirt
import pytest
from conftest import Mounted, eventually, libvirtd_clients_of, run

pytestmark = pytest.mark.qemu


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


# -- libvirtd killed while snapshots are being taken -------------------------------------

TESTBED = Path(__file__).resolve().parent.parent / "contrib" / "qemu-testbed.sh"
SECOND_PIDFILE = Path("/run/libvirtfs-testbed/libvirtd-second.pid")


@pytest.fixture
def second_uri(qemu_uri: str) -> Iterator[str]:
    """The second libvirtd of contrib/qemu-testbed.sh, reached over libvirt's remote
    protocol: a daemon no other test relies on staying up, which this one kills."""
    uri = run("bash", TESTBED, "start-second", timeout=120).stdout.strip().splitlines()[-1]
    yield uri
    run("bash", TESTBED, "start-second", timeout=120)  # running again, as found


def kill_second_libvirtd() -> None:
    pid = int(SECOND_PIDFILE.read_text())
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd"
    os.kill(pid, signal.SIGKILL)


def names(conn: libvirt.virConnect) -> dict[str, set[str]]:
    """libvirt's view: every domain, pool and network, and each domain's snapshots."""
    found = {"pools": {p.name() for p in conn.listAllStoragePools()},
             "networks": {n.name() for n in conn.listAllNetworks()}}
    for dom in conn.listAllDomains():
        found[f"domains/{dom.name()}"] = set(dom.snapshotListNames())
    return found


def tree(host: Path) -> dict[str, set[str]]:
    """The mount's view, in the same shape."""
    found = {folder: set(os.listdir(host / folder)) for folder in ("pools", "networks")}
    for domain in os.listdir(host / "domains"):
        snapshots = host / "domains" / domain / "snapshots"
        found[f"domains/{domain}"] = set(os.listdir(snapshots)) - {"current"}
    return found


def test_libvirtd_killed_during_snapshots(mount_factory, second_uri: str,
                                          tmp_path: Path) -> None:
    name = f"hangs-{uuid.uuid4().hex[:8]}"
    disk = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-f", "qcow2", disk, "16M")
    conn = libvirt.open(second_uri)
    conn.defineXML(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        f"<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{disk}'/>"
        f"<target dev='vda' bus='virtio'/></disk></devices></domain>")
    conn.close()
    try:
        mounted = mount_factory(f"far={second_uri}", options="timeout=5,cache_timeout=0")
        host = mounted.host("far")
        folder = host / "domains" / name

        def snapshot(n: int) -> int:
            try:
                (folder / "snapshots" / f"s{n:02d}").mkdir()
            except OSError as e:
                return e.errno or 0
            return 0

        def look(n: int) -> int:
            try:
                (folder / ("state", "info", "xml")[n % 3]).read_text()
                os.listdir(host / "domains")
            except OSError as e:
                return e.errno or 0
            return 0

        assert (folder / "state").read_text() == "shutoff\n"
        with ThreadPoolExecutor(16) as pool:
            calls = [pool.submit(snapshot, n) for n in range(8)]
            calls += [pool.submit(look, n) for n in range(8)]
            time.sleep(0.05)
            kill_second_libvirtd()  # kill -9, in the middle of it
            results = [call.result(timeout=60) for call in calls]
        # Each call either worked or says the connection broke; none hangs.
        assert set(results) <= {0, errno.ENOTCONN, errno.EIO, errno.ETIMEDOUT, errno.ENOENT,
                                errno.ECONNRESET, errno.EPIPE}, results
        # The testbed starts the second daemon with fresh definitions: the domain is gone
        # then, which the tree must show too.
        run("bash", TESTBED, "start-second", timeout=120)
        # No remount: the host answers again by itself, and the tree is libvirt's view.
        eventually(lambda: _assert("hostname: libvirtfs-second" in (host / "info").read_text()),
                   timeout=30)
        fresh = libvirt.open(second_uri)
        try:
            eventually(lambda: _assert(tree(host) == names(fresh)), timeout=15)
        finally:
            fresh.close()
    finally:
        run("bash", TESTBED, "start-second", timeout=120)
        with contextlib.suppress(libvirt.libvirtError):
            conn = libvirt.open(second_uri)
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByName(name).undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            conn.close()


def _assert(condition: bool) -> None:
    assert condition


# -- one QEMU monitor stuck --------------------------------------------------------------

GUEST = ("<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
         "<os><type arch='x86_64'>hvm</type></os></domain>")


@pytest.fixture
def stuck_guest(qemu_uri: str) -> Iterator[str]:
    name = f"hangs-{uuid.uuid4().hex[:8]}"
    yield name
    pidfile = Path(f"/run/libvirt/qemu/{name}.pid")
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pidfile.read_text()), signal.SIGCONT)
    run("virsh", "-c", qemu_uri, "destroy", name, check=False)
    run("virsh", "-c", qemu_uri, "undefine", name, check=False)


def test_a_stuck_qemu_monitor_leaves_the_host_answering(mount_factory, qemu_uri: str,
                                                       stuck_guest: str) -> None:
    mounted = mount_factory(f"lab={qemu_uri}", options="timeout=2,cache_timeout=0")
    host = mounted.host("lab")
    folder = host / "domains" / stuck_guest
    folder.mkdir()
    (folder / "xml").write_text(GUEST.format(name=stuck_guest))
    run("bash", "-c", f"echo start > {folder / 'control'}")
    qemu = int(Path(f"/run/libvirt/qemu/{stuck_guest}.pid").read_text())
    os.kill(qemu, signal.SIGSTOP)  # its monitor answers nothing now
    try:
        started = time.monotonic()
        result = run("bash", "-c", f"echo suspend > {folder / 'control'}", check=False)
        assert "Connection timed out" in result.stderr
        assert time.monotonic() - started < 5
        # The rest of the host, and what libvirt knows without asking QEMU, still answer,
        # each read well within the call timeout (2 s): none waits one out.
        reads = [lambda: (folder / "state").read_text() == "running\n",
                 lambda: stuck_guest in os.listdir(host / "domains"),
                 lambda: "libvirt-version" in (host / "info").read_text()]
        slowest = 0.0
        for _ in range(5):
            for read in reads:
                started = time.monotonic()
                assert read()
                slowest = max(slowest, time.monotonic() - started)
        assert slowest < 2, f"a read took {slowest:.1f} s"
        assert "is not answering" not in mounted.log()
    finally:
        os.kill(qemu, signal.SIGCONT)
    # QEMU carries the word out after all: the log says so, and the tree shows it.
    eventually(lambda: _assert((folder / "state").read_text() == "paused\n"), timeout=20)
    eventually(lambda: _assert("domain suspend on qemu:///system succeeded after it had "
                               "timed out" in mounted.log()), timeout=10)


# -- one of two daemons killed and restarted under a mount -------------------------------

def read_errno(read) -> tuple[int, float]:
    """(errno or 0, seconds) of one read through the mount."""
    started = time.monotonic()
    try:
        read()
    except OSError as e:
        return e.errno or -1, time.monotonic() - started
    return 0, time.monotonic() - started


def test_daemon_killed_and_restarted_under_a_two_host_mount(
        mount_factory, qemu_uri: str, second_uri: str) -> None:
    near_name, far_name, later_name = (f"lxc-{what}-{uuid.uuid4().hex[:6]}"
                                       for what in ("near", "far", "later"))
    with contextlib.closing(libvirt.open(qemu_uri)) as conn:
        conn.defineXML(GUEST.format(name=near_name))
    with contextlib.closing(libvirt.open(second_uri)) as conn:
        conn.defineXML(GUEST.format(name=far_name))
    # Default options: a 30 s call timeout, which no read below may wait out.
    mounted = mount_factory(f"near={qemu_uri}", f"far={second_uri}")
    near, far = mounted.host("near"), mounted.host("far")
    assert far_name in os.listdir(far / "domains")
    assert (far / "domains" / far_name / "state").read_text() == "shutoff\n"

    # Someone keeps working on the other host all along (its connection already open).
    reads = [lambda: (near / "domains" / near_name / "state").read_text(),
             lambda: (near / "info").read_text(),
             lambda: (near / "domains" / near_name / "xml").read_text()]
    for read in reads:
        read()
    stop = threading.Event()
    near_reads: list[tuple[int, float, float]] = []  # errno, seconds, when (since the kill)
    killed_at = time.monotonic()

    def keep_reading() -> None:
        while not stop.is_set():
            for read in reads:
                when = time.monotonic() - killed_at
                near_reads.append((*read_errno(read), round(when, 1)))
            time.sleep(0.05)

    reader = threading.Thread(target=keep_reading)
    reader.start()
    try:
        killed_at = time.monotonic()
        kill_second_libvirtd()  # kill -9: no goodbye on the connection
        try:
            far_reads = {
                "state": lambda: (far / "domains" / far_name / "state").read_text(),
                "info": lambda: (far / "domains" / far_name / "info").read_text(),
                "host info": lambda: (far / "info").read_text(),
                "ls domains": lambda: os.listdir(far / "domains"),
            }
            # Within the cache time (1 s) every read of that host fails...
            eventually(lambda: _assert(read_errno(far_reads["state"])[0] != 0), timeout=5)
            for _ in range(3):
                for what, read in far_reads.items():
                    err, took = read_errno(read)
                    # ...at once, each, and saying the host is not reachable: not a
                    # timeout per file, and not "no such file" (nothing is known gone).
                    assert err in (errno.ENOTCONN, errno.EIO), (what, err)
                    assert took < 2, f"{what} took {took:.1f} s to fail"
            assert sorted(os.listdir(mounted.path / "hosts")) == ["far", "near"]
            # status says so, from what libvirtfs knows, at once.
            eventually(lambda: _assert((far / "status").read_text().startswith(
                "disconnected: ")), timeout=5)
            assert (near / "status").read_text() == "connected\n"
        finally:
            run("bash", TESTBED, "start-second", timeout=120)  # a short window, always
        # No remount: the host answers again by itself.  The restarted daemon has fresh
        # definitions (the testbed copies its etc/ anew), and the tree says so.
        eventually(lambda: _assert("hostname: libvirtfs-second" in (far / "info").read_text()),
                   timeout=30)
        assert (far / "status").read_text() == "connected\n"
        eventually(lambda: _assert(far_name not in os.listdir(far / "domains")), timeout=15)
        with contextlib.closing(libvirt.open(second_uri)) as conn:
            conn.defineXML(GUEST.format(name=later_name))
        eventually(lambda: _assert(later_name in os.listdir(far / "domains")), timeout=5)
        assert (far / "domains" / later_name / "state").read_text() == "shutoff\n"
    finally:
        stop.set()
        reader.join()
        for uri, name in ((qemu_uri, near_name), (second_uri, far_name),
                          (second_uri, later_name)):
            run("virsh", "-c", uri, "undefine", name, check=False)
    # The other host never noticed.
    assert near_reads and all(err == 0 for err, _, _ in near_reads), near_reads
    slow = [(took, when) for _, took, when in near_reads if took >= 1]
    assert not slow, f"reads of the other host took so long (seconds, when since the kill): {slow}"
