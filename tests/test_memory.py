"""What the tree holds in memory per object, and what its work costs as it grows.

In this process, over libvirt's test driver, without a mount: tracemalloc counts what the
tree allocates (docs/performance.md has the RSS of a mounted process), and counts of the
lines run stand in for timings.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from libvirtfs.drivers.connection import Connection
from libvirtfs.drivers.host import Host
from libvirtfs.nodes.base import Context, File, QueryFile
from libvirtfs.nodes.domains import DomainDirectory, DomainsDirectory
from libvirtfs.nodes.hosts import RootDirectory
from libvirtfs.nodes.locks import LazyLock
from libvirtfs.vfs.operations import Operations

DOMAINS = 400
# What a domain folder may cost, its renderings and the driver's share included: with the
# files `cat */state */info */xml` reads made and rendered (about 10 KB before folders
# made their files on demand, locks became lazy and nodes got __slots__; 2.6 KB after),
# and with all of its files made (`ls -l` of every domain folder; 6.3 KB).
BYTES_PER_DOMAIN_READ = 3_500
BYTES_PER_DOMAIN_LISTED = 7_500


def host_xml(path: Path, domains: int) -> Path:
    parts = ["<node>"] + [f"<domain type='test'><name>vm-{i:05d}</name><memory>65536</memory>"
                          f"<os><type>hvm</type></os></domain>" for i in range(domains)]
    path.write_text("\n".join([*parts, "</node>"]))
    return path


@pytest.fixture
async def big_host(tmp_path: Path):
    host = Host(Connection(f"test://{host_xml(tmp_path / 'host.xml', DOMAINS)}", timeout=30),
                state_dir=tmp_path / "state")
    await host.open()
    yield host
    await host.connection.close()


class Clock:
    """Context.now that a test moves on."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def clocked_context(clock: Clock) -> Context:
    ctx = Context(cache_timeout=1.0)
    ctx.now = ctx.clock = clock  # type: ignore[method-assign]
    return ctx


async def read_files(domains: DomainsDirectory, names: tuple[str, ...]) -> None:
    """What `cat */state */info */xml` asks of the tree: a lookup, st_size, the bytes."""
    for name in list(await domains.children()):
        folder = await domains.lookup(name)
        for file_name in names:
            file = await folder.lookup(file_name)  # type: ignore[attr-defined]
            assert isinstance(file, File)
            await file.size()
            await file.content()


def allocated_since(snapshot: tracemalloc.Snapshot) -> int:
    gc.collect()
    return sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(
        snapshot, "filename"))


async def measure(host: Host, work) -> int:
    """Bytes per domain that `work(domains/)` leaves allocated (listing included)."""
    ctx = Context(cache_timeout=60.0)  # every rendering stays: the most they hold
    domains = DomainsDirectory(ctx, host)
    await host.list_domains()  # the driver's own first-call allocations are not ours
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        await work(domains)
        return allocated_since(before) // DOMAINS
    finally:
        tracemalloc.stop()


async def test_a_read_domain_folder_costs_little_memory(big_host: Host) -> None:
    per_domain = await measure(big_host, lambda d: read_files(d, ("state", "info", "xml")))
    assert per_domain < BYTES_PER_DOMAIN_READ, per_domain


async def test_a_listed_domain_folder_costs_little_memory(big_host: Host) -> None:
    async def list_all(domains: DomainsDirectory) -> None:
        for folder in (await domains.children()).values():
            for file in (await folder.children()).values():  # type: ignore[attr-defined]
                await file.size()

    per_domain = await measure(big_host, list_all)
    assert per_domain < BYTES_PER_DOMAIN_LISTED, per_domain


async def test_lookups_do_not_grow_memory(big_host: Host) -> None:
    domains = DomainsDirectory(Context(), big_host)
    names = list(await domains.children())
    for name in names:  # what the first pass makes may stay
        await (await domains.lookup(name)).find("state")  # type: ignore[attr-defined]
        await domains.find(f"nosuch-{name}")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for round_ in range(10):
            for name in names:
                folder = await domains.find(name)
                assert folder is not None
                assert await folder.find("state") is not None  # type: ignore[attr-defined]
                assert await folder.find(f"nosuch{round_}") is None  # type: ignore[attr-defined]
                assert await domains.find(f"nosuch-{round_}-{name}") is None
        grown = allocated_since(before)
    finally:
        tracemalloc.stop()
    # 16,000 lookups; a byte kept per lookup would be 16 KB.
    assert grown < 16_000, grown


async def test_a_lookup_makes_only_the_file_it_names(big_host: Host) -> None:
    domains = DomainsDirectory(Context(), big_host)
    folder = await domains.lookup("vm-00001")
    assert isinstance(folder, DomainDirectory)
    state = await folder.lookup("state")
    assert [node.name for node in folder.walk_known()] == ["vm-00001", "state"]
    assert await folder.find("nosuch") is None
    # Listing it makes the others; the one looked up keeps its node (and inode).
    listed = await folder.children()
    assert set(listed) == DomainDirectory.served_names
    assert listed["state"] is state
    assert [node.id for node in listed.values()] == sorted(node.id for node in listed.values())


async def test_a_domain_folder_builds_its_files_once(big_host: Host, monkeypatch) -> None:
    clock = Clock()
    domains = DomainsDirectory(clocked_context(clock), big_host)
    folder = await domains.lookup("vm-00002")
    assert isinstance(folder, DomainDirectory)
    listed = await folder.children()
    mtime = folder.mtime
    scans = 0
    scan = DomainDirectory.scan

    async def counted_scan(self):
        nonlocal scans
        scans += 1
        return await scan(self)

    monkeypatch.setattr(DomainDirectory, "scan", counted_scan)
    for _ in range(5):
        clock.now += 10  # far past cache_timeout
        folder.invalidate_all()  # as events do
        assert await folder.children() is listed
    assert scans == 0
    assert folder.mtime == mtime


async def test_an_expired_rendering_keeps_no_bytes(big_host: Host) -> None:
    clock = Clock()
    ctx = clocked_context(clock)
    domains = DomainsDirectory(ctx, big_host)
    xml = await (await domains.lookup("vm-00003")).lookup("xml")  # type: ignore[attr-defined]
    other = await (await domains.lookup("vm-00004")).lookup("xml")  # type: ignore[attr-defined]
    assert isinstance(xml, QueryFile) and isinstance(other, QueryFile)
    text = await xml.content()
    mtime = xml.mtime
    # While fresh, stat and read agree without asking libvirt again.
    assert await xml.size() == len(text)
    assert xml._cached is text
    clock.now += 5
    await other.content()  # any rendering lets go of those that expired
    assert xml._cached is None
    assert await xml.content() == text
    assert xml.mtime == mtime  # the same bytes: mtime stays


async def test_lazy_lock_excludes_and_queues_in_order() -> None:
    lock = LazyLock()
    order: list[int] = []
    inside = 0

    async def worker(n: int) -> None:
        nonlocal inside
        async with lock:
            inside += 1
            assert inside == 1
            order.append(n)
            await trio.sleep(0.01)
            inside -= 1

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(worker, n)
            await trio.sleep(0)  # each in turn reaches the lock
    assert order == [0, 1, 2, 3, 4]
    assert not lock.locked()
    assert lock._waiting is None  # nothing kept once nobody waits


async def test_lazy_lock_waiter_cancelled_leaves_the_queue() -> None:
    lock = LazyLock()
    await lock.acquire()
    got: list[str] = []

    async def waiter(name: str, scope: trio.CancelScope | None = None) -> None:
        if scope is None:
            await lock.acquire()
        else:
            with scope:
                await lock.acquire()
            if scope.cancelled_caught:
                got.append(f"{name} cancelled")
                return
        got.append(name)
        lock.release()

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "a", scope)
        await trio.sleep(0.01)
        nursery.start_soon(waiter, "b")
        await trio.sleep(0.01)
        scope.cancel()
        await trio.sleep(0.01)
        assert lock.locked()
        lock.release()
    assert got == ["a cancelled", "b"]
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()


class LineCount:
    """Counts the lines of libvirtfs code run in this thread inside `with`."""

    def __init__(self) -> None:
        self.lines = 0

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines += 1
        return self._local

    def _call(self, frame, event, arg):
        name = frame.f_code.co_filename
        return self._local if "/nodes/" in name or "/drivers/" in name else None

    def __enter__(self) -> LineCount:
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


async def test_mkdir_costs_the_same_however_many_folders_are_pending(tmp_path: Path) -> None:
    """mkdir of thousands of pending folders: the 2000th costs what the 20th did."""
    xml = host_xml(tmp_path / "small.xml", 5)
    host = Host(Connection(f"test://{xml}", timeout=30), state_dir=tmp_path / "state")
    await host.open()
    domains = DomainsDirectory(Context(), host)
    made = 0

    async def mkdirs(count: int) -> None:
        nonlocal made
        for _ in range(count):
            name = f"new-{made:05d}"
            assert await domains.find(name) is None  # the kernel's lookup first
            await domains.mkdir(name)
            made += 1

    costs = []
    for pending in (20, 2000):
        await mkdirs(pending - made)
        with LineCount() as count:
            await mkdirs(20)
        costs.append(count.lines)
    assert len(await domains.children()) == 5 + made
    await host.connection.close()
    small, large = costs
    assert large < small * 1.2, costs


async def test_readers_at_once_render_once_and_leave_no_lock() -> None:
    renders = 0

    async def render() -> bytes:
        nonlocal renders
        renders += 1
        await trio.sleep(0.05)
        return b"running\n"

    file = QueryFile(Context(), render)
    got: list[bytes] = []

    async def read() -> None:
        got.append(await file.content())

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(read)
    assert renders == 1
    assert got == [b"running\n"] * 5
    assert file._lock is None  # an idle file holds no lock


async def test_rmdir_costs_the_same_however_many_folders_are_pending(tmp_path: Path) -> None:
    """rm of thousands of pending folders, through the FUSE operations (no mount): the
    rmdir among 2,000 costs what it does among 40."""
    xml = host_xml(tmp_path / "small.xml", 5)
    host = Host(Connection(f"test://{xml}", timeout=30), state_dir=tmp_path / "state")
    await host.open()
    ctx = Context()
    operations = Operations(RootDirectory(ctx, {"t": host}), ctx)
    me = SimpleNamespace(pid=os.getpid())
    domains = 1
    for part in (b"hosts", b"t", b"domains"):
        domains = (await operations.lookup(domains, part, me)).st_ino
    names = [f"p{i:05d}".encode() for i in range(2040)]
    for name in names:
        await operations.mkdir(domains, name, 0o755, me)

    async def rmdirs(some: list[bytes]) -> int:
        with LineCount() as count:
            for name in some:
                await operations.rmdir(domains, name, me)
        return count.lines

    large = await rmdirs(names[:20])
    for name in names[20:-40]:
        await operations.rmdir(domains, name, me)
    small = await rmdirs(names[-40:-20])
    assert len(await (await operations.root.lookup("hosts")).children()) == 1
    await host.connection.close()
    assert large < small * 1.2, (small, large)
