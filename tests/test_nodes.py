"""The tree without a mount: nodes over libvirt's test driver, in this process."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from libvirtfs.drivers.connection import Connection
from libvirtfs.drivers.errors import DriverError
from libvirtfs.drivers.faults import FaultRules
from libvirtfs.drivers.host import Host
from libvirtfs.nodes.base import Context, Directory, File, QueryFile
from libvirtfs.nodes.handles import ContentHandle, DocumentHandle, WordHandle
from libvirtfs.nodes.hosts import HostDirectory, RootDirectory
from libvirtfs.nodes.names import from_filename, to_filename


@pytest.fixture
def testhost(tmp_path) -> Host:
    # A host of our own (a file-backed test:/// URI), so tests do not share state.
    xml = tmp_path / "host.xml"
    xml.write_text("<node><domain type='test'><name>alpha</name><memory>65536</memory>"
                   "<os><type>hvm</type></os></domain></node>")
    return Host(Connection(f"test://{xml}", timeout=5))


async def walk(node: Directory, path: str) -> object:
    for part in filter(None, path.split("/")):
        node = await node.lookup(part)  # type: ignore[assignment]
    return node


async def test_tree_paths(testhost: Host) -> None:
    ctx = Context()
    root = RootDirectory(ctx, {"lab": testhost})
    assert root.id == 1
    state = await walk(root, "hosts/lab/domains/alpha/state")
    assert isinstance(state, File)
    assert await state.content() == b"running\n"
    assert state.path == "/hosts/lab/domains/alpha/state"
    names = set(await (await walk(root, "hosts/lab")).children())
    assert names == {"uri", "status", "info", "capabilities.xml", "domains", "pools",
                     "networks"}


async def test_state_mtime_moves_only_when_the_state_changes(testhost: Host) -> None:
    now = [1_800_000_000.0]
    ctx = Context(cache_timeout=1.0)
    ctx.now = ctx.clock = lambda: now[0]  # type: ignore[method-assign]
    host_dir = HostDirectory(ctx, testhost)
    state = await walk(host_dir, "domains/alpha/state")
    assert isinstance(state, QueryFile)
    assert await state.content() == b"running\n"
    created = state.mtime

    now[0] += 5
    assert await state.content() == b"running\n"
    assert state.mtime == created

    # A file-backed test:/// host is private to its connection: suspend through ours.
    await testhost.connection.call(lambda conn: conn.lookupByName("alpha").suspend())
    assert await state.content() == b"running\n"  # still cached
    now[0] += 5
    assert await state.content() == b"paused\n"
    assert state.mtime == now[0]


async def test_a_wall_clock_set_back_keeps_no_rendering_for_ever(testhost: Host) -> None:
    # Freshness runs on a monotonic clock: with the wall clock, setting it back an hour
    # (by hand or NTP) kept every rendering an hour longer, and showed a stale state.
    wall, monotonic = [1_800_000_000.0], [1000.0]
    ctx = Context(cache_timeout=1.0)
    ctx.now = lambda: wall[0]  # type: ignore[method-assign]
    ctx.clock = lambda: monotonic[0]  # type: ignore[method-assign]
    state = await walk(HostDirectory(ctx, testhost), "domains/alpha/state")
    assert isinstance(state, QueryFile)
    assert await state.content() == b"running\n"
    wall[0] -= 3600
    await testhost.connection.call(lambda conn: conn.lookupByName("alpha").suspend())
    monotonic[0] += 1.5
    assert await state.content() == b"paused\n"
    assert state.mtime == wall[0]  # mtime stays wall-clock time


async def test_nodes_keep_identity_across_rescans_and_renames(testhost: Host) -> None:
    ctx = Context(cache_timeout=0)
    domains = await walk(HostDirectory(ctx, testhost), "domains")
    alpha = await domains.lookup("alpha")
    await testhost.connection.call(lambda conn: conn.lookupByName("alpha").destroy())
    await testhost.connection.call(lambda conn: conn.lookupByName("alpha").rename("beta", 0))
    beta = await domains.lookup("beta")
    assert beta is alpha and beta.id == alpha.id
    with pytest.raises(OSError) as caught:
        await domains.lookup("alpha")
    assert caught.value.errno == errno.ENOENT


async def test_gone_object_gives_enoent(testhost: Host) -> None:
    ctx = Context(cache_timeout=0)
    state = await walk(HostDirectory(ctx, testhost), "domains/alpha/state")
    await testhost.connection.call(lambda conn: conn.lookupByName("alpha").destroy())
    await testhost.connection.call(lambda conn: conn.lookupByName("alpha").undefine())
    with pytest.raises(DriverError) as caught:
        await state.content()
    assert caught.value.errno == errno.ENOENT
    assert "not found" in caught.value.strerror


async def test_slow_call_times_out_and_the_host_answers_other_calls(testhost: Host) -> None:
    testhost.connection.timeout = 0.2
    with pytest.raises(DriverError) as caught:
        await testhost.connection.call(lambda conn: __import__("time").sleep(1))
    assert caught.value.errno == errno.ETIMEDOUT
    # One slow call says nothing about the host: the liveness probe answers.
    with trio.fail_after(1):
        assert await testhost.uri()


async def test_a_host_whose_probe_goes_unanswered_fails_fast_until_it_answers(
        testhost: Host, tmp_path) -> None:
    rules = tmp_path / "faults"
    rules.write_text(f"{testhost.connection.requested_uri} delay 1\n")
    testhost.connection.faults = FaultRules(str(rules))
    testhost.connection.timeout = 0.2
    with pytest.raises(DriverError) as caught:
        await testhost.uri()
    assert caught.value.errno == errno.ETIMEDOUT
    await trio.sleep(0.3)  # the probe has waited its 0.2 s
    with trio.fail_after(0.1), pytest.raises(DriverError) as caught:
        await testhost.uri()
    assert caught.value.errno == errno.ETIMEDOUT
    assert "is not answering" in caught.value.strerror
    rules.unlink()
    await trio.sleep(1.5)  # the probe returns: the host answers again
    with trio.fail_after(1):
        assert await testhost.uri()


# -- open files, without a mount: each kind of file opens its own handle ------------------

async def open_file(testhost: Host, path: str, flags: int):
    node = await walk(HostDirectory(Context(cache_timeout=0), testhost), path)
    assert isinstance(node, File)
    return node, await node.open_handle(flags)


async def test_a_reader_keeps_the_content_it_opened(testhost: Host) -> None:
    state, handle = await open_file(testhost, "domains/alpha/state", os.O_RDONLY)
    assert isinstance(handle, ContentHandle)
    await testhost.connection.call(lambda conn: conn.lookupByName("alpha").suspend())
    assert await state.content() == b"paused\n"
    assert await handle.read(0, 100) == b"running\n"
    assert await handle.read(3, 2) == b"ni"
    with pytest.raises(OSError) as caught:
        await handle.write(0, b"x")
    assert caught.value.errno == errno.EBADF


async def test_a_read_only_file_refuses_to_open_for_writing(testhost: Host) -> None:
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
        with pytest.raises(OSError) as caught:
            await open_file(testhost, "domains/alpha/state", flags)
        assert caught.value.errno == errno.EACCES


async def test_a_document_commits_at_flush_only_when_written(testhost: Host) -> None:
    xml, handle = await open_file(testhost, "domains/alpha/xml", os.O_WRONLY | os.O_TRUNC)
    assert isinstance(handle, DocumentHandle)
    before = await xml.content()
    await handle.flush()  # the shell's `>` closes once before it writes: nothing happens
    await handle.release()
    assert await xml.content() == before

    _, handle = await open_file(testhost, "domains/alpha/xml", os.O_RDWR)
    assert await handle.read(0, len(before)) == before
    new = before.replace(b"65536", b"131072")
    assert await handle.write(0, new) == len(new)
    assert await xml.content() == before  # written, not yet committed
    await handle.flush()
    assert b"131072" in await xml.content()


async def test_a_bad_document_is_refused_at_flush_and_recorded(testhost: Host) -> None:
    xml, handle = await open_file(testhost, "domains/alpha/xml", os.O_WRONLY | os.O_TRUNC)
    before = await xml.content()
    await handle.write(0, b"<domain type='test'><name>alpha</name>")  # write() accepts it
    with pytest.raises(OSError) as caught:
        await handle.flush()
    assert caught.value.errno == errno.EINVAL
    assert "malformed" in (await xml.xattrs())["user.error"].decode()
    await handle.flush()  # reported once; nothing left to commit
    assert await xml.content() == before


async def test_a_refused_write_spoils_the_document(testhost: Host) -> None:
    xml, handle = await open_file(testhost, "domains/alpha/xml", os.O_WRONLY | os.O_APPEND)
    before = await xml.content()
    with pytest.raises(OSError) as caught:
        await handle.write(0, b" " * (xml.max_size or 0))
    assert caught.value.errno == errno.EFBIG
    assert "at most" in xml.last_error
    with pytest.raises(OSError) as caught:
        await handle.flush()  # close() reports the refused write and commits nothing
    assert caught.value.errno == errno.EFBIG
    await handle.flush()
    assert await xml.content() == before


async def test_what_is_at_hand_is_answered_at_once_and_only_that(testhost: Host) -> None:
    # The vfs answers these without awaiting (vfs/operations.py, fast paths): each must say
    # None (ask the slow way) unless its answer is exactly what the slow way would give.
    now = [1_800_000_000.0]
    ctx = Context(cache_timeout=1.0)
    ctx.now = ctx.clock = lambda: now[0]  # type: ignore[method-assign]
    host_dir = HostDirectory(ctx, testhost)
    domains = await walk(host_dir, "domains")
    assert isinstance(domains, Directory)
    alpha = await domains.lookup("alpha")
    assert isinstance(alpha, Directory)
    assert domains.find_now("alpha") == (True, alpha)
    assert domains.find_now("nosuch") == (True, None)
    assert alpha.size_now() == 0
    state = await alpha.lookup("state")
    assert isinstance(state, QueryFile)
    xml = await alpha.lookup("xml")
    assert xml.size_now() is None and xml.open_now(os.O_RDONLY) is None  # not rendered
    # `state` comes from the host's table, which is at hand: rendered at once, the same
    # bytes as the slow way.
    assert state.size_now() == 8 and state.content_now() == b"running\n"
    assert alpha.find_now("state") == (True, state)
    assert alpha.find_now("nosuch") == (True, None)

    assert await state.size() == 8
    assert state.size_now() == 8
    handle = state.open_now(os.O_RDONLY)
    assert isinstance(handle, ContentHandle)
    assert handle.read_now(0, 100) == await handle.read(0, 100) == b"running\n"
    assert handle.flush_now() and handle.release_now()
    assert state.open_now(os.O_WRONLY) is None and state.open_now(os.O_RDWR) is None

    now[0] += 1  # cache_timeout later: no kept rendering or listing is at hand any more
    assert xml.size_now() is None and xml.open_now(os.O_RDONLY) is None
    assert domains.find_now("alpha") == (False, None)
    assert (await host_dir.lookup("status")).size_now() is None  # rendered at every read
    testhost.stale("domain")  # and once the host's table is not at hand, `state` is not
    assert state.size_now() is None and state.open_now(os.O_RDONLY) is None
    assert await state.size() == 8
    assert state.size_now() == 8

    xml, document = await open_file(testhost, "domains/alpha/xml", os.O_RDWR)
    assert isinstance(document, DocumentHandle)
    assert document.flush_now()  # nothing written: a close() with nothing to commit
    await document.write(0, await xml.content())
    assert not document.flush_now()  # close() commits: its error must reach close()
    await document.flush()
    assert document.flush_now()
    with pytest.raises(OSError):
        await document.write(0, b" " * ((xml.max_size or 0) + 1))
    assert not document.flush_now()  # close() reports the refused write


async def test_control_words_are_carried_out_at_write(testhost: Host) -> None:
    control, handle = await open_file(testhost, "domains/alpha/control", os.O_WRONLY)
    assert isinstance(handle, WordHandle)
    with pytest.raises(OSError) as caught:
        await handle.write(0, b"frobnicate\n")
    assert caught.value.errno == errno.EINVAL
    assert "unknown control word 'frobnicate'" in control.last_error
    assert await handle.write(0, b"suspend\n") == len(b"suspend\n")
    assert control.last_error == ""
    state = await control.parent.lookup("state")
    assert await state.content() == b"paused\n"
    await handle.flush()  # nothing is left for close()
    await handle.release()


async def test_autostart_takes_its_word_at_write(testhost: Host) -> None:
    autostart, handle = await open_file(testhost, "domains/alpha/autostart",
                                        os.O_WRONLY | os.O_TRUNC)
    with pytest.raises(OSError) as caught:
        await handle.write(0, b"maybe\n")
    assert caught.value.errno == errno.EINVAL
    await handle.write(0, b"1\n")
    assert await autostart.content() == b"1\n"


async def test_a_scratch_file_is_emptied_by_o_trunc_at_once(testhost: Host) -> None:
    alpha = await walk(HostDirectory(Context(cache_timeout=0), testhost), "domains/alpha")
    scratch = await alpha.create("notes")
    handle = await scratch.open_handle(os.O_WRONLY)
    await handle.write(0, b"hello")
    await handle.flush()
    assert await scratch.content() == b"hello"
    handle = await scratch.open_handle(os.O_WRONLY | os.O_TRUNC)
    assert await scratch.content() == b""
    with pytest.raises(OSError) as caught:
        await handle.write(0, b"x" * (scratch.max_size + 1))
    assert caught.value.errno == errno.EFBIG


def test_reporting_records_the_reason_and_lets_the_error_go_on() -> None:
    node = File(Context())
    with pytest.raises(OSError), node.reporting():
        raise OSError(errno.EBUSY, "the domain is running")
    assert node.last_error == "the domain is running"
    with pytest.raises(OSError), node.reporting(unless=(errno.ENOTSUP,)):
        raise OSError(errno.ENOTSUP, "user.mime_type cannot be set")
    assert node.last_error == "the domain is running"


@pytest.mark.parametrize("name", ["a/b", ".", "..", "%2F", "x\x00y", "é/ü", "a%b", "plain"])
def test_names_escape_reversibly(name: str) -> None:
    filename = to_filename(name)
    assert "/" not in filename and "\x00" not in filename
    assert filename not in (".", "..")
    assert from_filename(filename) == name


def test_reserved_names_are_escaped() -> None:
    assert to_filename("current", frozenset({"current"})) == "%63urrent"
    assert from_filename("%63urrent") == "current"


class MovingHost(Host):
    """A test:/// host that "migrates" by defining the domain on the other host and
    undefining it here (the test driver has none), and whose listings wait for `go` when
    `hold` is set: a listing in flight while a domain leaves."""

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self.hold = False
        self.go = trio.Event()

    async def list_domains(self) -> list[tuple[str, str]]:
        listing = await super().list_domains()
        if self.hold:
            await self.go.wait()
        return listing

    async def migrate(self, uuid, destination, words, params, *, what="migrate") -> None:
        def move(conn) -> None:
            dom = conn.lookupByUUIDString(uuid)
            xml = dom.XMLDesc(0)
            with destination.connection.using() as dconn:
                dconn.defineXML(xml).create()
            dom.destroy()
            dom.undefine()
        await self.connection.call(move)


async def test_a_folder_moved_by_mv_survives_a_listing_of_its_old_host_in_flight(
        tmp_path) -> None:
    hosts = {}
    for name in ("a", "b"):
        xml = tmp_path / f"{name}.xml"
        domain = ("<domain type='test'><name>alpha</name><memory>65536</memory>"
                  "<os><type>hvm</type></os></domain>") if name == "a" else ""
        xml.write_text(f"<node>{domain}</node>")
        hosts[name] = MovingHost(Connection(f"test://{xml}", timeout=5))
    root = RootDirectory(Context(), hosts)
    source = await walk(root, "hosts/a/domains")
    target = await walk(root, "hosts/b/domains")
    folder = await walk(root, "hosts/a/domains/alpha")
    before = await walk(root, "hosts/a/domains/alpha/state")
    assert isinstance(source, Directory) and isinstance(target, Directory)
    async with trio.open_nursery() as nursery:
        hosts["a"].hold = True
        nursery.start_soon(lambda: source.children(refresh=True))  # lists alpha, then waits
        await trio.sleep(0.1)
        await source.rename("alpha", target, "alpha")
        hosts["a"].go.set()
    assert folder.alive, "the listing begun before the move made the moved folder vanish"
    assert (await target.children())["alpha"] is folder
    assert "alpha" not in await source.children(refresh=True)
    # Its files are the same nodes (the kernel may hand out their inodes before it hears
    # of the move), and they show the domain on b.
    state = await folder.lookup("state")
    assert state is before and state.alive
    assert isinstance(state, File) and await state.content() == b"running\n"
    assert folder.path == "/hosts/b/domains/alpha"


class SlowReturnHost(MovingHost):
    """Its migration returns only once `done` is set, after the domain has left: the tail
    of a real migration (libvirt's confirm phase, the job's end) while listings go on."""

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self.left = trio.Event()
        self.done = trio.Event()

    async def migrate(self, uuid, destination, words, params, *, what="migrate") -> None:
        await super().migrate(uuid, destination, words, params, what=what)
        self.left.set()
        await self.done.wait()


async def test_a_folder_moved_by_mv_survives_a_listing_of_its_old_host_during_the_move(
        tmp_path) -> None:
    hosts = {}
    for name in ("a", "b"):
        xml = tmp_path / f"{name}.xml"
        domain = ("<domain type='test'><name>alpha</name><memory>65536</memory>"
                  "<os><type>hvm</type></os></domain>") if name == "a" else ""
        xml.write_text(f"<node>{domain}</node>")
        hosts[name] = SlowReturnHost(Connection(f"test://{xml}", timeout=5))
    root = RootDirectory(Context(), hosts)
    source = await walk(root, "hosts/a/domains")
    target = await walk(root, "hosts/b/domains")
    folder = await walk(root, "hosts/a/domains/alpha")
    assert isinstance(source, Directory) and isinstance(target, Directory)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.rename, "alpha", target, "alpha")
        await hosts["a"].left.wait()
        # An event of host a (the domain undefined there) has its folder listed anew
        # before the migration has returned.
        assert "alpha" not in await source.children(refresh=True)
        hosts["a"].done.set()
    assert folder.alive, "a listing during the move made the moved folder vanish"
    assert (await target.children())["alpha"] is folder
    assert folder.path == "/hosts/b/domains/alpha"


async def test_a_connection_in_use_when_its_host_is_removed_is_closed_when_released() -> None:
    """rmdir of a host while a migration holds its connection (as destination, through
    `using()`): close_now leaves it to that call, and its end must close it; otherwise
    its socket and its event registrations live as long as the mount."""
    connection = Connection("test:///default", timeout=5)
    await connection.call(lambda conn: conn.getURI())
    with connection.using() as conn:  # the migration's hold
        await trio.to_thread.run_sync(connection.close_now)
        assert conn.isAlive()  # in use: not closed under the call
    with pytest.raises(Exception):  # noqa: B017 - libvirt's "invalid connection pointer"
        conn.getURI()
