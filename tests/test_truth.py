"""Nothing false: what the mount shows after a change is the change (issue 7).

Races are made deterministic with drivers/faults.py: `stall N` lets libvirt answer and then
holds the answer back N seconds, so a read or a listing in flight carries an older truth
than a change made meanwhile through another path into the same mount.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import Mounted, eventually, expect_errno, info, run, sh, write_file

STALL = 2.0

VM = """<domain type='test'>
  <name>{name}</name>
  <memory unit='KiB'>65536</memory>
  <os><type>hvm</type></os>
</domain>
"""


@pytest.fixture
def slow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mount_factory):
    """A test:/// host `lab` with a running domain `vm`, an hour-long cache, and a faults
    file: slow.stall(METHOD) holds back the answers of libvirt calls made by that method of
    drivers/host.py (all calls without one) until slow.resume()."""
    host_xml = tmp_path / "lab.xml"
    host_xml.write_text("<node>" + VM.format(name="vm") + "</node>")
    rules = tmp_path / "faults"
    monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
    uri = f"test://{host_xml}"

    mounted = mount_factory(f"lab={uri}", options="timeout=10,cache_timeout=3600")
    yield SimpleNamespace(
        host=mounted.host("lab"),
        stall=lambda call="": rules.write_text(f"{uri} stall {STALL} {call}\n"),
        resume=rules.unlink)
    rules.unlink(missing_ok=True)


def in_background(fn, *args):
    """Start fn(*args) in a thread; give it time to reach libvirt."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    time.sleep(0.5)
    assert not future.done(), "the call was meant to be held back"
    return future


# -- a change made while a read or a listing is in flight -------------------------------

def test_a_read_in_flight_never_hides_a_control_word(slow) -> None:
    vm = slow.host / "domains/vm"
    sh(f"echo suspend > {vm}/control")
    slow.stall()
    reading = in_background((vm / "state").read_text)  # libvirt says paused, late
    slow.resume()
    sh(f"echo resume > {vm}/control")
    assert reading.result() in ("paused\n", "running\n")  # true when it asked
    assert (vm / "state").read_text() == "running\n"
    assert info(vm / "info")["state"] == "running"


def test_a_listing_in_flight_never_drops_a_domain_defined_meanwhile(slow) -> None:
    domains = slow.host / "domains"
    (domains / "new").mkdir()
    inode = os.stat(domains / "new").st_ino
    slow.stall("list_domains")
    sh(f"echo suspend > {domains}/vm/control")  # the listing is now old
    listing = in_background(os.listdir, domains)  # libvirt lists vm alone, late
    write_file(domains / "new/xml", VM.format(name="new"))
    slow.resume()
    assert "vm" in listing.result()
    assert sorted(os.listdir(domains)) == ["new", "vm"]
    assert os.stat(domains / "new").st_ino == inode
    assert {e.name: e.inode() for e in os.scandir(domains)}["new"] == inode
    assert (domains / "new/state").read_text() == "shutoff\n"


def test_a_listing_during_a_define_shows_the_new_domain_once(slow) -> None:
    domains = slow.host / "domains"
    (domains / "new").mkdir()
    inode = os.stat(domains / "new").st_ino
    slow.stall("define")
    defining = in_background(write_file, domains / "new/xml", VM.format(name="new"))
    sh(f"echo suspend > {domains}/vm/control")  # the listing is now old
    # libvirt has defined it; the writer has not heard yet.
    listed = {e.name: e.inode() for e in os.scandir(domains)}
    defining.result()
    assert listed["new"] == inode
    assert {e.name: e.inode() for e in os.scandir(domains)}["new"] == inode
    assert os.stat(domains / "new").st_ino == inode


# -- info, state and autostart agree after a change through the mount -------------------

def test_info_and_state_agree_after_control_and_autostart(slow) -> None:
    vm = slow.host / "domains/vm"
    assert info(vm / "info")["autostart"] == "no"
    assert (vm / "state").read_text() == "running\n"
    sh(f"echo 1 > {vm}/autostart")
    assert info(vm / "info")["autostart"] == "yes"
    assert (vm / "autostart").read_text() == "1\n"
    sh(f"echo suspend > {vm}/control")
    assert info(vm / "info")["state"] == "paused"
    assert (vm / "state").read_text() == "paused\n"


# -- removals and renames leave no ghost -----------------------------------------------

def test_a_removed_folder_stays_gone_for_whoever_holds_it(demo: Mounted, tmp_path: Path) -> None:
    domains = demo.host() / "domains"
    (domains / "web").mkdir()
    write_file(domains / "web/xml", VM.format(name="web"))
    held = os.open(domains / "web", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert "state" in os.listdir(held)
        os.rmdir(domains / "web")
        expect_errno(errno.ENOENT, os.stat, domains / "web")
        expect_errno(errno.ENOENT, os.listdir, held)
        expect_errno(errno.ENOENT, lambda: os.stat("state", dir_fd=held))
    finally:
        os.close(held)


def test_mv_leaves_no_ghost_of_the_old_name(demo: Mounted) -> None:
    domains = demo.host() / "domains"
    (domains / "a").mkdir()
    write_file(domains / "a/xml", VM.format(name="a"))
    inode = os.stat(domains / "a").st_ino
    run("mv", domains / "a", domains / "b")
    expect_errno(errno.ENOENT, os.stat, domains / "a")
    assert os.stat(domains / "b").st_ino == inode
    assert sorted(os.listdir(domains)) == ["b", "test"]
    assert info(domains / "b/info")["name"] == "b"


# -- a missing name costs one lookup per cache_timeout ---------------------------------

def test_a_missing_name_is_looked_up_once(mount_factory) -> None:
    mounted = mount_factory("test:///default", options="cache_timeout=30")
    domains = mounted.host() / "domains"
    os.listdir(domains)
    for _ in range(100):
        expect_errno(errno.ENOENT, os.stat, domains / "nothere")
    assert len(re.findall(r"lookup\(\d+, b'nothere'", mounted.log())) == 1
    # ...and the name can be made at once, and holds what is written.
    (domains / "nothere").mkdir()
    assert os.listdir(domains / "nothere") == []
    expect_errno(errno.ENOENT, os.stat, domains / "nothere/state")  # not defined yet
    write_file(domains / "nothere/xml", VM.format(name="nothere"))
    assert (domains / "nothere/state").read_text() == "shutoff\n"
    os.rmdir(domains / "nothere")
    expect_errno(errno.ENOENT, os.stat, domains / "nothere")
    (domains / "nothere").mkdir()
    assert os.listdir(domains / "nothere") == []


# -- generations, without a mount -----------------------------------------------------

async def test_a_render_overtaken_by_a_change_is_returned_but_not_kept() -> None:
    import trio

    from libvirtfs.nodes.base import Context, QueryFile

    truth, asked = [b"paused\n"], trio.Event()
    release = trio.Event()

    async def render() -> bytes:
        answer = truth[0]
        asked.set()
        await release.wait()  # libvirt answered; the answer is on its way
        return answer

    state = QueryFile(Context(cache_timeout=3600), render)
    async with trio.open_nursery() as nursery:
        results: list[bytes] = []

        async def read() -> None:
            results.append(await state.content())

        nursery.start_soon(read)
        await asked.wait()
        truth[0] = b"running\n"
        state.invalidate()  # a control word changed it meanwhile
        release.set()
    assert results == [b"paused\n"]
    assert await state.content() == b"running\n"


async def test_a_listing_overtaken_by_a_change_drops_nothing_and_lists_again() -> None:
    import trio

    from libvirtfs.nodes.base import Context, Directory, Entry, File

    ctx = Context(cache_timeout=3600)
    listed = [["vm"]]
    scans = 0

    class Folder(Directory):
        async def scan(self) -> list[Entry]:
            nonlocal scans
            scans += 1
            names = list(listed[0])
            await trio.sleep(0.1)
            return [Entry(name, name, lambda: File(ctx)) for name in names]

    folder = Folder(ctx)
    await folder.children()
    vm = folder.known("vm")
    listed[0] = ["vm", "new"]
    folder.invalidate()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(folder.children)
        await trio.sleep(0.05)
        listed[0] = ["vm", "new", "newer"]
        folder.invalidate()  # defined meanwhile
    assert sorted(await folder.children()) == ["new", "newer", "vm"]
    assert folder.known("vm") is vm
    assert scans == 3  # the overtaken listing was listed again, once


# -- the kernel's invalidation queue ---------------------------------------------------

def test_an_event_storm_drops_no_invalidation() -> None:
    from libvirtfs.nodes.base import Context, Directory
    from libvirtfs.vfs.inodes import InodeTable
    from libvirtfs.vfs.kernel_cache import KernelCache

    ctx = Context()
    root = Directory(ctx)
    cache = KernelCache(InodeTable(root))
    for n in range(50_000):
        cache.entry_changed(root, f"vm-{n}", None)
        cache.node_changed(root)
    # Every name is kept; the same node's attributes need forgetting only once.
    assert cache.pending() == 50_001


# -- changes made elsewhere: another host folder on the same test:///default ----------

@pytest.fixture
def elsewhere(mount_factory):
    """(mine, theirs): domains/ of two host folders of one mount, two connections to the
    one test:///default of the mount process; an hour-long cache, so only libvirt's
    events and what libvirtfs makes of them can tell `mine` about changes in `theirs`."""
    mounted = mount_factory("test:///default", "other=test:///default",
                            options="cache_timeout=3600")
    return mounted.host("test") / "domains", mounted.host("other") / "domains"


def test_a_domain_defined_anew_elsewhere_shows_whole(elsewhere) -> None:
    mine, theirs = elsewhere
    (theirs / "web").mkdir()
    write_file(theirs / "web/xml", VM.format(name="web"))
    folder = mine / "web"
    eventually(lambda: _assert(folder.exists()))
    full = ["autostart", "control", "disks", "info", "job", "live.xml", "snapshots",
            "state", "xml"]
    assert sorted(os.listdir(folder)) == full
    assert (folder / "state").read_text() == "shutoff\n"
    assert "start" in (folder / "control").read_text()
    os.rmdir(theirs / "web")  # undefine...
    (theirs / "web").mkdir()  # ...and define again: a new UUID, the same name
    write_file(theirs / "web/xml", VM.format(name="web"))
    new_uuid = info(theirs / "web/info")["uuid"]
    # `mine` learns of both changes from libvirt's events, which take a moment: between
    # them the domain was truly gone, so a short ENOENT for the folder is the truth then.
    # Whenever the folder is there, though, it is whole and the new domain's.
    _listed_within(folder, seconds=5)
    for _ in range(2):  # once listed, and once every event has arrived
        assert sorted(os.listdir(folder)) == full
        assert (folder / "state").read_text() == "shutoff\n"
        assert info(folder / "info")["uuid"] == new_uuid
        time.sleep(0.5)
    sh(f"echo start > {folder}/control")
    assert (folder / "state").read_text() == "running\n"
    assert info(folder / "info")["state"] == "running"


def test_a_domain_removed_elsewhere_leaves_no_ghost(elsewhere) -> None:
    mine, theirs = elsewhere
    (theirs / "web").mkdir()
    write_file(theirs / "web/xml", VM.format(name="web"))
    eventually(lambda: _assert((mine / "web").exists()))
    held = os.open(mine / "web", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert "state" in os.listdir(held)
        os.rmdir(theirs / "web")
        eventually(lambda: _assert(not (mine / "web").exists()))
        assert "web" not in os.listdir(mine)
        expect_errno(errno.ENOENT, os.listdir, held)
    finally:
        os.close(held)


def test_a_name_probed_then_defined_elsewhere_appears(elsewhere) -> None:
    mine, theirs = elsewhere
    expect_errno(errno.ENOENT, os.stat, mine / "web")  # remembered as missing...
    (theirs / "web").mkdir()
    write_file(theirs / "web/xml", VM.format(name="web"))
    eventually(lambda: _assert((mine / "web").exists()))  # ...until the event says otherwise
    assert (mine / "web/state").read_text() == "shutoff\n"


# -- changes made elsewhere (virsh on the real libvirtd) -------------------------------

GUEST = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
</domain>
"""

IN_DELETE_SELF = 0x400


def watch(path: Path):
    """inotifywait -e delete_self PATH: returns (fd, has it been told PATH is deleted)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    assert fd >= 0
    assert libc.inotify_add_watch(fd, bytes(path), IN_DELETE_SELF) >= 0
    told: list[int] = []

    def deleted() -> bool:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            data = b""
        for offset in range(0, len(data), 16):  # no names: events on the watched path
            told.append(struct.unpack_from("iIII", data, offset)[1])
        return any(mask & IN_DELETE_SELF for mask in told)

    return fd, deleted


@pytest.fixture
def guest(qemu_uri: str, tmp_path: Path):
    name = f"truth-{uuid.uuid4().hex[:8]}"
    document = tmp_path / "guest.xml"
    document.write_text(GUEST.format(name=name))
    yield name, document
    run("virsh", "-c", qemu_uri, "destroy", name, check=False)
    run("virsh", "-c", qemu_uri, "undefine", name, check=False)


def _virsh(uri: str, *args: str | os.PathLike) -> str:
    return run("virsh", "-c", uri, *args).stdout.strip()


@pytest.mark.qemu
def test_undefine_and_define_elsewhere_never_shows_half_a_folder(
        mount_factory, qemu_uri: str, guest) -> None:
    name, document = guest
    mounted = mount_factory(f"lab={qemu_uri}", options="cache_timeout=3600")
    folder = mounted.host("lab") / "domains" / name
    _virsh(qemu_uri, "define", document)
    eventually(lambda: _assert(folder.exists()), timeout=3)
    full = ["autostart", "control", "disks", "info", "job", "live.xml", "snapshots",
            "state", "xml"]
    assert sorted(os.listdir(folder)) == full
    assert (folder / "state").read_text() == "shutoff\n"
    assert "start" in (folder / "control").read_text()
    _virsh(qemu_uri, "undefine", name)
    _virsh(qemu_uri, "define", document)  # a new UUID, the same name
    new_uuid = _virsh(qemu_uri, "domuuid", name)
    for _ in range(2):  # at once, and once libvirt's events have arrived
        assert sorted(os.listdir(folder)) == full
        assert (folder / "state").read_text() == "shutoff\n"
        assert info(folder / "info")["uuid"] == new_uuid
        time.sleep(1)
    sh(f"echo start > {folder}/control")
    assert (folder / "state").read_text() == "running\n"
    assert info(folder / "info")["state"] == "running"


@pytest.mark.qemu
def test_undefine_elsewhere_leaves_no_ghost(mount_factory, qemu_uri: str, guest) -> None:
    name, document = guest
    mounted = mount_factory(f"lab={qemu_uri}", options="cache_timeout=3600")
    domains = mounted.host("lab") / "domains"
    _virsh(qemu_uri, "define", document)
    eventually(lambda: _assert((domains / name).exists()), timeout=3)
    assert (domains / name / "state").read_text() == "shutoff\n"
    held = os.open(domains / name, os.O_RDONLY | os.O_DIRECTORY)  # a shell's cwd, say
    fd, deleted = watch(domains / name)
    try:
        _virsh(qemu_uri, "undefine", name)
        eventually(lambda: _assert(not (domains / name).exists()), timeout=3)
        expect_errno(errno.ENOENT, os.stat, domains / name)
        assert name not in os.listdir(domains)
        expect_errno(errno.ENOENT, os.listdir, held)
        os.close(held)  # the last user lets go: the watcher hears of the deletion
        held = -1
        eventually(lambda: _assert(deleted()), timeout=3)
    finally:
        if held >= 0:
            os.close(held)
        os.close(fd)


@pytest.mark.qemu
def test_a_name_missing_then_defined_elsewhere_appears(
        mount_factory, qemu_uri: str, guest) -> None:
    name, document = guest
    mounted = mount_factory(f"lab={qemu_uri}", options="cache_timeout=3600")
    domains = mounted.host("lab") / "domains"
    expect_errno(errno.ENOENT, os.stat, domains / name)  # cached as missing...
    _virsh(qemu_uri, "define", document)
    # ...until libvirt's event says otherwise.
    eventually(lambda: _assert((domains / name).exists()), timeout=3)
    assert (domains / name / "state").read_text() == "shutoff\n"


@pytest.mark.qemu
def test_a_rename_elsewhere_moves_the_folder(mount_factory, qemu_uri: str, guest) -> None:
    name, document = guest
    mounted = mount_factory(f"lab={qemu_uri}", options="cache_timeout=3600")
    domains = mounted.host("lab") / "domains"
    _virsh(qemu_uri, "define", document)
    eventually(lambda: _assert((domains / name).exists()), timeout=3)
    inode = os.stat(domains / name).st_ino
    renamed = name + "-r"
    try:
        _virsh(qemu_uri, "domrename", name, renamed)
        eventually(lambda: _assert(not (domains / name).exists()), timeout=3)
        assert os.stat(domains / renamed).st_ino == inode
        assert info(domains / renamed / "info")["name"] == renamed
    finally:
        run("virsh", "-c", qemu_uri, "undefine", renamed, check=False)


def _assert(condition: bool) -> None:
    assert condition


def _listed_within(folder: Path, seconds: float) -> None:
    """Wait until `folder` can be listed (only FileNotFoundError is waited out)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            os.listdir(folder)
            return
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)



def test_control_shows_its_new_size_at_once_after_a_word(mount_factory) -> None:
    """`control` has an inode per program, which no invalidation reaches: stat must not
    serve a size cached before the word changed what it lists."""
    mounted = mount_factory("test:///default", options="cache_timeout=3600")
    control = mounted.host() / "domains" / "test" / "control"
    fd = os.open(control, os.O_RDONLY)  # held, as a watching program would
    try:
        assert os.fstat(fd).st_size == len(control.read_bytes())
        sh(f"echo destroy > {control}")
        listed = control.read_bytes()
        assert listed.startswith(b"start\n")
        assert os.fstat(fd).st_size == len(listed)
        assert os.stat(control).st_size == len(listed)
    finally:
        os.close(fd)
