"""What a pass over a host costs libvirt: calls counted on the real driver
(drivers/counting.py, LIBVIRTFS_COUNT_CALLS), never guessed from timings.

Listing a collection and reading `state` and `info` of every object costs a number of
calls that does not grow with the number of objects (the host's tables, drivers/tables.py),
a warm pass costs none, and a missing name costs none while libvirt's events keep the
listing true.  The mounts run in this process (tests/inprocess.py), where the counts are.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
import trio
from conftest import eventually, expect_errno, run, sh
from inprocess import InProcessMount, allow_in_a_thread

from libvirtfs.drivers import counting
from libvirtfs.drivers.connection import Connection
from libvirtfs.drivers.host import Host

DOMAIN = ("<domain type='test'><name>{}</name><memory>65536</memory><vcpu>1</vcpu>"
          "<os><type>hvm</type></os></domain>")


def host_xml(path: Path, n: int) -> Path:
    path.write_text("<node>" + "".join(DOMAIN.format(f"vm-{i:04d}") for i in range(n))
                    + "</node>")
    return path


def calls(counts: dict[str, int]) -> int:
    """Calls that reach libvirt (not the hops)."""
    return counts.get("total", 0)


def cost(action) -> dict[str, int]:
    """The libvirt calls `action()` makes, by method name, plus `hops` and `total`."""
    before = counting.snapshot()
    action()
    after = counting.snapshot()
    return {name: n - before.get(name, 0) for name, n in after.items()
            if n - before.get(name, 0)}


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """counted(uri, options) -> the mount's host folder, served in this process with its
    libvirt calls counted.  One mount at a time (pyfuse3 serves one per process): a new
    one unmounts the last."""
    allow_in_a_thread(monkeypatch)
    monkeypatch.setenv(counting.ENVIRONMENT, "1")
    mounts: list[InProcessMount] = []

    def mount(uri: str, options: str = "") -> Path:
        if mounts:
            mounts.pop().stop()
        mounted = InProcessMount(tmp_path / "mnt", f"lab={uri}", options)
        mounted.start()
        mounts.append(mounted)
        return mounted.path / "hosts/lab"

    yield mount
    for mounted in mounts:
        mounted.stop()


def a_pass(host: Path, *files: str) -> None:
    """`ls -l domains/` and `cat domains/*/FILE` for each file, as a user types them."""
    domains = host / "domains"
    sh(f"ls -l {domains} > /dev/null")
    for name in files:
        sh(f"cat {domains}/*/{name} > /dev/null")


def test_a_pass_costs_the_same_at_50_and_200_domains(counted, tmp_path: Path) -> None:
    costs = {}
    for n in (50, 200):
        # A pass slower than cache_timeout (a loaded machine) would fetch `info` twice:
        # a long one, so that the pass is measured, not the machine.  Nothing has asked
        # for `info` yet, so its pass makes the one batch whatever the timeout.
        host = counted(f"test://{host_xml(tmp_path / f'h{n}.xml', n)}", "cache_timeout=60")
        os.listdir(host / "domains")  # the first listing (and the records' host) is paid
        costs[n] = {"listing and state": cost(lambda host=host: a_pass(host, "state")),
                    "info": cost(lambda host=host: a_pass(host, "info"))}
    small, large = costs[50], costs[200]
    # Listing and state are kept by libvirt's events: nothing to ask again in the pass.
    assert calls(small["listing and state"]) == calls(large["listing and state"]) <= 1, costs
    # info: one batch per refresh, O(1) in its calls but for the test driver's
    # getAllDomainStats, which gives the state alone, so that `info()` fills in per domain.
    for n, costs_n in costs.items():
        per_domain = costs_n["info"].get("info", 0)
        assert per_domain == n, costs
        assert calls(costs_n["info"]) - per_domain <= 4, costs
        assert costs_n["info"].get("hops", 0) <= 2, costs


def test_a_warm_pass_makes_no_call(counted, tmp_path: Path) -> None:
    host = counted(f"test://{host_xml(tmp_path / 'h.xml', 50)}", "cache_timeout=30")
    a_pass(host, "state", "info")
    assert cost(lambda: a_pass(host, "state", "info")) == {}


def test_the_first_pass_on_a_fresh_mount_makes_no_call(counted, tmp_path: Path) -> None:
    """The host's domains, pools and networks are listed as it is attached, so the first
    `ls -l` and `cat */state` wait for no batched call (the benchmark's cold pass)."""
    host = counted(f"test://{host_xml(tmp_path / 'h.xml', 200)}")
    spent = cost(lambda: (a_pass(host, "state"), sh(f"ls {host}/pools {host}/networks")))
    assert calls(spent) == 0, spent


def test_an_expired_pass_costs_one_batch_not_one_call_per_file(counted,
                                                             tmp_path: Path) -> None:
    host = counted(f"test://{host_xml(tmp_path / 'h.xml', 200)}")
    a_pass(host, "state")
    time.sleep(1.2)  # every rendering and the kernel's caches have expired
    spent = cost(lambda: a_pass(host, "state"))
    assert calls(spent) == 0, spent  # the table is kept by events, not by time


def test_missing_names_cost_nothing(counted, tmp_path: Path) -> None:
    host = counted(f"test://{host_xml(tmp_path / 'h.xml', 50)}")
    domains = host / "domains"
    os.listdir(domains)
    spent = cost(lambda: sh(f"for i in $(seq 1000); do stat {domains}/nosuch$i "
                            f"2>/dev/null; done; true", timeout=120))
    assert calls(spent) == 0, spent
    expect_errno(errno.ENOENT, os.stat, domains / "nosuch1")


def test_a_host_without_tables_asks_per_file(counted, tmp_path: Path) -> None:
    """cache_timeout=0 asks libvirt at every read, as documented: each file its own call."""
    host = counted(f"test://{host_xml(tmp_path / 'h.xml', 20)}", "cache_timeout=0")
    spent = cost(lambda: a_pass(host, "state"))
    assert spent.get("state", 0) >= 20, spent


def test_changes_through_the_mount_read_back_at_once(counted, tmp_path: Path) -> None:
    host = counted(f"test://{host_xml(tmp_path / 'h.xml', 5)}", "cache_timeout=3600")
    vm = host / "domains/vm-0001"
    a_pass(host, "state", "info")
    for word, state in (("suspend", "paused"), ("resume", "running"), ("destroy", "shutoff"),
                        ("start", "running")):
        sh(f"echo {word} > {vm}/control")
        assert (vm / "state").read_text() == f"{state}\n"
        assert f"state: {state}\n" in (vm / "info").read_text()
    sh(f"echo 1 > {vm}/autostart")
    assert "autostart: yes\n" in (vm / "info").read_text()


async def test_readers_waiting_for_a_fetch_share_the_next_one(tmp_path: Path) -> None:
    """On a busy host an event lands during most fetches, so a fetch is handed to its reader
    but not kept.  The readers that waited meanwhile take one fetch begun after they
    asked, not one each in turn (which made a pass O(N) fetches of N domains), and never
    the one that was running when they asked (it may predate what they know)."""
    host = Host(Connection(f"test://{host_xml(tmp_path / 'h.xml', 20)}", timeout=30),
                state_dir=tmp_path / "state", cache_timeout=60)
    await host.open()
    table = host.tables.domain
    table.watched(True)  # kept by events, as on a mount
    fetch, fetches = table._fetch, []
    inside, go_on = threading.Event(), threading.Event()

    def busy_host(conn, full):
        fetches.append(full)
        inside.set()
        go_on.wait(30)
        rows = fetch(conn, full)
        table.mark()  # an event came meanwhile: what was fetched is not kept
        return rows

    table._fetch = busy_host
    got = []

    async def read() -> None:
        got.append(len(await table.rows()))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.to_thread.run_sync(inside.wait, 30)  # the first fetch is running
            for _ in range(7):
                nursery.start_soon(read)
            await trio.sleep(0.1)  # all seven wait for the table
            go_on.set()
    finally:
        await host.connection.close()
    assert got == [20] * 8
    assert len(fetches) == 2, fetches


# -- changes made by virsh in another process, on the real libvirtd ---------------------

GUEST = ("<domain type='qemu'><name>{}</name><memory unit='MiB'>64</memory>"
         "<os><type arch='x86_64'>hvm</type></os></domain>")


@pytest.fixture
def guests(qemu_uri: str) -> Iterator[list[str]]:
    """20 defined domains named tables-*, removed afterwards."""
    conn = libvirt.open(qemu_uri)
    prefix = f"tables-{uuid.uuid4().hex[:6]}"
    names = [f"{prefix}-{i:02d}" for i in range(20)]
    for name in names:
        conn.defineXML(GUEST.format(name))
    yield names
    for dom in conn.listAllDomains():
        if dom.name().startswith(prefix):
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
    conn.close()


@pytest.mark.qemu
def test_qemu_info_of_every_domain_is_one_batch(counted, qemu_uri: str,
                                                guests: list[str]) -> None:
    host = counted(qemu_uri)
    domains = host / "domains"
    run("virsh", "-c", qemu_uri, "start", guests[0])
    # The start's events have reached the mount (each one would rightly make a reader
    # fetch again: on a loaded machine they came during the pass timed below).
    def started() -> None:
        assert (domains / guests[0] / "state").read_text() == "running\n"
    eventually(started, 10)
    os.listdir(domains)
    time.sleep(1.2)
    files = " ".join(f"{domains}/{name}/info" for name in guests)
    spent = cost(lambda: sh(f"cat {files} > /dev/null"))
    # getAllDomainStats and three filtered listings, whatever the number of domains.
    assert calls(spent) <= 4 and spent.get("hops", 0) <= 1, spent
    lines = dict(line.split(": ", 1) for line in
                 (domains / guests[0] / "info").read_text().splitlines())
    assert lines["state"] == "running" and int(lines["cpu-time"]) > 0
    assert lines["memory"] == lines["max-memory"] == "65536"
    assert lines["persistent"] == "yes" and lines["vcpus"] == "1"


@pytest.mark.qemu
def test_qemu_changes_by_virsh_show_within_a_second(counted, qemu_uri: str, tmp_path: Path,
                                                    guests: list[str]) -> None:
    host = counted(qemu_uri, "cache_timeout=3600")  # only events can tell the mount
    domains = host / "domains"
    name = guests[0]

    def shows(path: Path, text: str) -> None:
        try:
            assert path.read_text() == text
        except FileNotFoundError:
            raise AssertionError(f"{path} is not there yet") from None

    a_pass(host, "state")
    virsh = ["virsh", "-c", qemu_uri]
    run(*virsh, "start", name)
    eventually(lambda: shows(domains / name / "state", "running\n"), timeout=1)
    run(*virsh, "destroy", name)
    eventually(lambda: shows(domains / name / "state", "shutoff\n"), timeout=1)
    run(*virsh, "undefine", name)
    eventually(lambda: _assert(name not in os.listdir(domains)), timeout=1)
    expect_errno(errno.ENOENT, os.stat, domains / name)
    xml = tmp_path / "guest.xml"
    xml.write_text(GUEST.format(name))
    run(*virsh, "define", xml)
    eventually(lambda: shows(domains / name / "state", "shutoff\n"), timeout=1)
    # Warm again: a pass over every domain asks libvirt nothing.
    a_pass(host, "state")
    assert calls(cost(lambda: a_pass(host, "state"))) == 0


def _assert(condition: bool) -> None:
    assert condition
