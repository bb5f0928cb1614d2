"""`cat` of a file whose size the kernel surely holds is one READ, through the kernel's
page cache, instead of two with direct_io (vfs/page_cache.py).  Whatever size the kernel
believes, a reader gets the whole content of its open, and an expired `state` is answered
from the host's table at once, without a wait (`waited.` counts)."""

from __future__ import annotations

import os
import threading
import time

import libvirt
from conftest import run, write_file
from hypothesis import given, settings
from hypothesis import strategies as st
from inprocess import InProcessMount, allow_in_a_thread

from libvirtfs.vfs.page_cache import SizesTold


def counters(path) -> dict[str, int]:
    text = run("getfattr", "--only-values", "-n", "user.counters", path).stdout
    return {name: int(n) for name, n in (line.split() for line in text.splitlines())}


def test_cat_after_ls_l_is_one_read(mount_factory) -> None:
    mounted = mount_factory("test:///default", options="cache_timeout=30")
    domain = mounted.host() / "domains/test"
    run("ls", "-l", domain)
    before = counters(mounted.path)
    assert run("cat", domain / "state").stdout == "running\n"
    assert run("cat", domain / "info").stdout.startswith("name: test\n")
    after = counters(mounted.path)
    assert after["fuse.read"] - before["fuse.read"] == 2
    # `xml` can be written, so the kernel may set its size itself: always direct_io (2).
    assert run("cat", domain / "xml").stdout.startswith("<domain")
    assert counters(mounted.path)["fuse.read"] - after["fuse.read"] == 2


def test_a_state_that_grew_since_its_stat_is_read_whole(mount_factory) -> None:
    """The kernel holds `paused` (7 bytes) as the size, for 30 s; the domain resumes
    (`running`, 8 bytes): every reader still gets all 8."""
    mounted = mount_factory("test:///default", options="cache_timeout=30")
    domain = mounted.host() / "domains/test"
    for _ in range(10):
        write_file(domain / "control", "suspend\n")
        assert run("stat", "-c", "%s", domain / "state").stdout == "7\n"
        write_file(domain / "control", "resume\n")
        assert run("cat", domain / "state").stdout == "running\n"
        with open(domain / "state", "rb") as f:
            assert f.read() == b"running\n"


def test_a_file_read_again_after_a_change_is_read_whole(mount_factory) -> None:
    """Sizes told one after the other (8, 7, 8 bytes): until the older ones have expired
    in the kernel, reads do not trust any of them."""
    mounted = mount_factory("test:///default", options="cache_timeout=30")
    state = mounted.host() / "domains/test/state"
    for word in ("suspend", "resume", "suspend", "resume"):
        write_file(state.parent / "control", f"{word}\n")
        expected = "paused\n" if word == "suspend" else "running\n"
        for _ in range(3):
            assert run("cat", state).stdout == expected
            assert int(run("stat", "-c", "%s", state).stdout) == len(expected)


def test_an_expired_state_is_answered_without_a_wait(mount_factory) -> None:
    mounted = mount_factory("test:///default", options="cache_timeout=0.5")
    state = mounted.host() / "domains/test/state"
    assert state.read_text() == "running\n"
    time.sleep(0.7)  # the rendering has expired; libvirt's events keep the table
    before = counters(mounted.path)
    assert run("stat", "-c", "%s", state).stdout == "8\n"
    assert state.read_text() == "running\n"
    after = counters(mounted.path)

    def waited(counts: dict[str, int]) -> int:  # reading the counters is 2 getxattr
        return counts["waited.total"] - counts.get("waited.getxattr", 0)
    assert waited(after) == waited(before)


# What the kernel may hold: any size told whose attribute time has not run out, since
# it drops a reply made before the one it holds, and may apply them in any order.
_VALID = 1.0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3), st.integers(0, 3)), min_size=1, max_size=20),
       st.floats(0, 3), st.integers(0, 3))
def test_settled_means_every_size_the_kernel_may_hold_is_that_one(
        told: list[tuple[float, int]], wait: float, length: int) -> None:
    sizes = SizesTold()
    now = 0.0
    held: list[tuple[float, int]] = []  # (until, size)
    for step, size in told:
        now += step
        sizes.told(7, size, now, _VALID)
        held.append((now + _VALID, size))
    now += wait
    if sizes.settled_at(7, length, now):
        assert all(size == length for until, size in held if until > now)
        # and the kernel will not ask for the size again while the open reads it
        assert now < held[-1][0] - _VALID / 4
    last = told[-1][1]
    sizes.told(7, last, now + _VALID + 1.0, _VALID)  # the same size again, much later
    assert sizes.settled_at(7, last, now + _VALID + 1.0)
    sizes.forget(7)
    assert not sizes.settled_at(7, length, now)


def test_states_changed_behind_the_mount_are_never_read_cut_short(tmp_path, monkeypatch) -> None:
    """libvirt changes the domain behind the mount (this process's own connection to the
    in-process test host), and the mount hears of it by an event a moment later: readers
    meanwhile get the old state or the new one, whole, never a cut one, whatever size the
    kernel holds."""
    allow_in_a_thread(monkeypatch)
    mounted = InProcessMount(tmp_path / "mnt", "lab=test:///default", "cache_timeout=30")
    mounted.start()
    conn = libvirt.open("test:///default")
    try:
        domain = conn.lookupByName("test")
        state = mounted.path / "hosts/lab/domains/test/state"
        seen = set()
        for _ in range(30):
            for change in (domain.suspend, domain.resume):
                change()
                for _ in range(5):
                    with open(state, "rb") as f:
                        seen.add(f.read())
                    seen.add(run("cat", state).stdout.encode())
        assert seen <= {b"paused\n", b"running\n"}, seen
    finally:
        if domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            domain.resume()
        conn.close()
        mounted.stop()


def test_a_reader_gets_what_it_opened_while_the_size_changes(mount_factory) -> None:
    """A reader opened `state` ("running\\n") and has not read yet; the domain is suspended
    through the mount and the reader's own fstat asks the size again: it still reads the
    8 bytes it opened, not 7 of them, and the size it is shown is 8 until it closes."""
    mounted = mount_factory("test:///default", options="cache_timeout=30")
    domain = mounted.host() / "domains/test"
    run("ls", "-l", domain)  # the size is told: the open reads through the page cache
    try:
        with open(domain / "state", "rb", buffering=0) as reader:
            write_file(domain / "control", "suspend\n")
            assert os.fstat(reader.fileno()).st_size == 8
            assert reader.read(4096) == b"running\n"
            assert reader.read(4096) == b""
        assert run("cat", domain / "state").stdout == "paused\n"
        assert run("stat", "-c", "%s", domain / "state").stdout == "7\n"
    finally:
        write_file(domain / "control", "resume\n")


def test_a_slow_reader_gets_what_it_opened_after_the_cache_time(mount_factory) -> None:
    """A program opens `state` ("running\\n"), is busy for longer than cache_timeout (an
    editor, a loaded machine), and the domain is suspended meanwhile: its read still gives
    the 8 bytes it opened, not "running" cut at the new size."""
    mounted = mount_factory("test:///default", options="cache_timeout=0.5")
    domain = mounted.host() / "domains/test"
    run("ls", "-l", domain)  # the size is told: the open reads through the page cache
    try:
        with open(domain / "state", "rb", buffering=0) as reader:
            time.sleep(0.8)
            write_file(domain / "control", "suspend\n")
            assert reader.read(4096) == b"running\n"
            assert os.fstat(reader.fileno()).st_size == 8
        assert run("cat", domain / "state").stdout == "paused\n"
        assert run("stat", "-c", "%s", domain / "state").stdout == "7\n"
    finally:
        write_file(domain / "control", "resume\n")


def test_two_readers_of_one_file_never_get_each_others_bytes(mount_factory) -> None:
    """A program reads the first 64 KiB of a big `xml` (300,000 a's in its description);
    the description is rewritten with as many b's (the same length) and `cat` reads it
    whole; the first program's next reads still give its own a's, not the b's that `cat`
    left in the kernel's page cache."""
    mounted = mount_factory("test:///default", options="cache_timeout=2")
    domain = mounted.host() / "domains/test"
    xml = (domain / "xml").read_text()

    def described(letter: str) -> str:
        return xml.replace("<name>test</name>", "<name>test</name><description>"
                           f"{letter * 300_000}</description>", 1)
    write_file(domain / "xml", described("a"))
    first = (domain / "xml").read_bytes()
    run("ls", "-l", domain)
    time.sleep(3.2)  # the kernel holds no size but the new one's
    run("ls", "-l", domain)  # told again: the next open reads through the page cache
    with open(domain / "xml", "rb", buffering=0) as reader:
        got = reader.read(65536)
        write_file(domain / "xml", described("b"))
        second = run("cat", domain / "xml").stdout.encode()
        assert len(second) == len(first) and b"b" * 1000 in second
        while chunk := reader.read(65536):
            got += chunk
    assert got == first, f"{got.count(b'a')} a's and {got.count(b'b')} b's"


def test_readers_of_xml_get_it_whole_while_a_writer_rewrites_it(mount_factory) -> None:
    """A writer that opens `xml` with O_TRUNC and writes makes the kernel set the file's
    size itself (0, then what it wrote), behind any size told: readers meanwhile must
    still get the whole definition they opened."""
    mounted = mount_factory("test:///default")
    xml = mounted.host() / "domains/test/xml"
    whole = xml.read_text()
    stop = threading.Event()

    def rewrite() -> None:
        while not stop.is_set():
            with open(xml, "w") as f:  # the same definition again: a commit changes nothing
                for start in range(0, len(whole), 64):
                    f.write(whole[start:start + 64])
                    f.flush()

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        bad = []
        for _ in range(400):
            run("ls", "-l", xml.parent)
            text = xml.read_text()
            if "<name>test</name>" not in text:
                bad.append(text[:80])
        assert not bad, f"{len(bad)} of 400 reads were not the definition: {bad[:3]}"
    finally:
        stop.set()
        writer.join()
