"""hosts/NAME/events: what happens on a host, one line per event, read with cat, tail -f,
grep -m1, head and Python; Ctrl-C, kill and unmount end a waiting reader at once."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import Mounted, eventually, guest_xml, holding_open, run, sh, write_file

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (\S+) (\S+) (\S+) (\S+)$")

GUEST = """<domain type='test'>
  <name>{name}</name>
  <memory>65536</memory>
  <os><type>hvm</type></os>
</domain>
"""


class Reader:
    """A program reading an events file in the background, its output in a file."""

    def __init__(self, command: list[str], out: Path) -> None:
        self.out = out
        self.process = subprocess.Popen(command, stdout=open(out, "wb"),  # noqa: SIM115
                                        stderr=subprocess.PIPE, text=True)

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def events(self) -> list[tuple[str, str, str, str]]:
        """(kind, name, event, detail) of each line, which must all be well formed."""
        found = []
        for line in self.lines():
            match = LINE.match(line)
            assert match, line
            found.append(match.groups())
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def readers(tmp_path: Path):
    started: list[Reader] = []

    def start(*command: str | Path) -> Reader:
        reader = Reader([str(c) for c in command], tmp_path / f"reader-{len(started)}.out")
        started.append(reader)
        holding_open(reader.process, count=max(1, sum("/events" in str(c) for c in command)))
        return reader

    yield start
    for reader in started:
        reader.stop()


def say(path: Path, word: str) -> None:
    sh(f"echo '{word}' > {path}")


def seen(reader: Reader, *wanted: tuple[str, ...], timeout: float = 5.0) -> None:
    """Each of `wanted` (a prefix of kind, name, event, detail) shows up, in order."""
    def check() -> None:
        events = reader.events()
        at = 0
        for want in wanted:
            while at < len(events) and events[at][:len(want)] != want:
                at += 1
            assert at < len(events), (want, events)
            at += 1
    eventually(check, timeout)


def test_cat_streams_every_event_from_its_open_on(demo: Mounted, readers) -> None:
    host = demo.host()
    control = host / "domains/test/control"
    first = readers("cat", host / "events")
    say(control, "suspend")
    seen(first, ("domain", "test", "suspended", "paused"))
    second = readers("cat", host / "events")
    say(control, "resume")
    seen(first, ("domain", "test", "suspended", "paused"),
         ("domain", "test", "resumed", "unpaused"))
    seen(second, ("domain", "test", "resumed", "unpaused"))
    assert ("domain", "test", "suspended", "paused") not in second.events()
    # The time is UTC with milliseconds, and now.
    stamp = first.lines()[-1].split()[0]
    assert abs(time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
               - time.timezone - time.time()) < 60
    assert first.process.poll() is None and second.process.poll() is None


def test_lifecycle_of_domains_networks_and_pools(demo: Mounted, readers) -> None:
    host = demo.host()
    reader = readers("cat", host / "events")
    domain = host / "domains/ev1"
    domain.mkdir()
    write_file(domain / "xml", GUEST.format(name="ev1"))
    say(domain / "control", "start")
    say(domain / "control", "destroy")
    domain.rmdir()
    say(host / "networks/default/control", "stop")
    say(host / "networks/default/control", "start")
    say(host / "pools/default-pool/control", "stop")
    say(host / "pools/default-pool/control", "start")
    seen(reader,
         ("domain", "ev1", "defined", "added"), ("domain", "ev1", "started", "booted"),
         ("domain", "ev1", "stopped", "destroyed"), ("domain", "ev1", "undefined", "removed"),
         ("network", "default", "stopped", "-"), ("network", "default", "started", "-"),
         ("pool", "default-pool", "stopped", "-"), ("pool", "default-pool", "started", "-"))


def test_names_with_spaces_percent_and_tabs_stay_one_field(demo: Mounted, readers) -> None:
    host = demo.host()
    reader = readers("cat", host / "events")
    for name, folder in [("a b%c", "a b%25c"), ("tab\tname", "tab\tname")]:
        (host / "domains" / folder).mkdir()
        write_file(host / "domains" / folder / "xml", GUEST.format(name=name))
    seen(reader, ("domain", "a%20b%25c", "defined", "added"),
         ("domain", "tab%09name", "defined", "added"))


def test_tail_f_shows_events_live(demo: Mounted, readers) -> None:
    host = demo.host()
    tail = readers("tail", "-f", host / "events")
    time.sleep(1.2)  # tail has read the file's end and polls now
    say(host / "domains/test/control", "suspend")
    seen(tail, ("domain", "test", "suspended", "paused"), timeout=3)
    say(host / "domains/test/control", "resume")
    seen(tail, ("domain", "test", "resumed", "unpaused"), timeout=3)
    assert tail.process.poll() is None
    assert len(tail.lines()) == 2, tail.lines()  # nothing from before it started
    # -n0 starts at the end, as st_size says; -s polls more often.
    quick = readers("tail", "-n0", "-s", "0.2", "-f", host / "events")
    time.sleep(0.5)
    say(host / "domains/test/control", "suspend")
    seen(quick, ("domain", "test", "suspended", "paused"), timeout=3)
    assert len(quick.lines()) == 1
    # tail -f of every host, as a glob: `events` is found by name, though ls skips it.
    assert sh(f"cd {demo.path} && echo hosts/*/events").stdout == "hosts/test/events\n"


def test_tail_f_of_two_hosts_names_a_file_only_when_it_has_news(mount_factory,
                                                                readers) -> None:
    # Both folders show the same test:///default host, so each event comes twice.
    mounted = mount_factory("test:///default", "other=test:///default")
    tail = readers("tail", "-s", "0.2", "-f", *sorted(mounted.path.glob("hosts/*/events")))
    time.sleep(1.5)  # polls that find nothing new print nothing
    say(mounted.host() / "domains/test/control", "suspend")

    def both_seen() -> None:
        assert tail.out.read_text().count("domain test suspended paused") == 2
    eventually(both_seen)
    time.sleep(1.0)
    headers = [line for line in tail.lines() if line.startswith("==> ")]
    # One header per file at the start, then one before each file's news.
    assert len(headers) <= 4, tail.lines()


def test_grep_head_and_python_return_at_the_first_match(demo: Mounted, readers) -> None:
    host = demo.host()
    events = host / "events"
    grep = readers("grep", "-m1", "domain test resumed", events)
    head = readers("head", "-n1", events)
    python = readers(sys.executable, "-c", f"print(open({str(events)!r}).readline(), end='')")
    say(host / "domains/test/control", "suspend")
    for reader in (head, python):
        assert reader.process.wait(timeout=5) == 0
        assert reader.events() == [("domain", "test", "suspended", "paused")]
    time.sleep(0.3)
    assert grep.process.poll() is None
    say(host / "domains/test/control", "resume")
    assert grep.process.wait(timeout=5) == 0
    assert grep.events() == [("domain", "test", "resumed", "unpaused")]


def test_st_size_is_what_the_reader_has_in_front_of_it(demo: Mounted) -> None:
    events = demo.host() / "events"
    assert events.stat().st_size == 0  # for ls -l, and for whoever does not read it
    with open(events, "rb") as f:
        assert os.fstat(f.fileno()).st_size == 1  # tail -f's way in: see docs/hosts.md
        say(demo.host() / "domains/test/control", "suspend")
        line = f.readline()
        assert LINE.match(line.decode().rstrip("\n"))
        assert os.fstat(f.fileno()).st_size == len(line)  # where its offset stands
        say(demo.host() / "domains/test/control", "resume")

        def news_waits() -> None:
            assert os.fstat(f.fileno()).st_size > len(line)
        eventually(news_waits)
    assert events.stat().st_size == 0
    assert "events" not in os.listdir(demo.host())


# -- ending a reader that waits ----------------------------------------------------------


def test_ctrl_c_ends_cat_at_once(demo: Mounted) -> None:
    started = time.monotonic()
    result = run("timeout", "-s", "INT", "1", "cat", demo.host() / "events", check=False)
    assert result.returncode == 124
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_signal_ends_a_waiting_reader(demo: Mounted, readers, signum: int) -> None:
    for command in (["tail", "-f"], ["cat"]):
        reader = readers(*command, demo.host() / "events")
        time.sleep(1.2)  # tail is in its poll loop
        started = time.monotonic()
        reader.process.send_signal(signum)
        assert reader.process.wait(timeout=5) == -signum, command
        assert time.monotonic() - started < 0.5, command
    assert (demo.host() / "domains/test/state").read_text() == "running\n"


def test_keyboard_interrupt_reaches_python_in_readline(demo: Mounted) -> None:
    script = f"""
import os, signal, threading, time
f = open({str(demo.host() / 'events')!r})
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
started = time.monotonic()
try:
    f.readline()
except KeyboardInterrupt:
    print(round(time.monotonic() - started, 1))
"""
    result = run(sys.executable, "-c", script, timeout=10)
    assert float(result.stdout) < 1.0


def test_a_stopped_and_continued_reader_carries_on(demo: Mounted, readers) -> None:
    reader = readers("cat", demo.host() / "events")
    reader.process.send_signal(signal.SIGSTOP)
    say(demo.host() / "domains/test/control", "suspend")
    reader.process.send_signal(signal.SIGCONT)
    say(demo.host() / "domains/test/control", "resume")
    seen(reader, ("domain", "test", "suspended"), ("domain", "test", "resumed"))
    assert reader.process.poll() is None


def test_unmount_with_a_reader_waiting(demo: Mounted, readers) -> None:
    reader = readers("cat", demo.host() / "events")
    started = time.monotonic()
    # Like any open file, the reader keeps the mount busy: fusermount3 -u says so at once.
    busy = run("fusermount3", "-u", demo.path, check=False, timeout=10)
    assert busy.returncode != 0 and "busy" in busy.stderr
    run("fusermount3", "-u", "-z", demo.path, timeout=10)
    assert reader.process.wait(timeout=5) != 0
    assert os.strerror(errno.ECANCELED) in reader.process.stderr.read()
    assert demo.process.wait(timeout=10) == 0
    assert time.monotonic() - started < 5


def test_a_host_added_by_mkdir_has_events_and_rmdir_ends_its_readers(mount_factory,
                                                                      readers) -> None:
    mounted = mount_factory("test:///default")
    added = mounted.path / "hosts/added"
    added.mkdir()
    assert not (added / "events").exists()  # nothing to follow until it is connected
    sh(f"echo test:///default > {added}/uri")
    reader = readers("cat", added / "events")
    say(added / "domains/test/control", "suspend")
    seen(reader, ("domain", "test", "suspended", "paused"))
    os.rmdir(added)
    assert reader.process.wait(timeout=5) == 0  # the end of the file
    assert reader.events()[-1] == ("host", "added", "removed", "-")


# -- slow readers, the host's own events ---------------------------------------------------


def test_a_reader_that_falls_behind_is_told_how_many_it_missed(demo: Mounted,
                                                               readers) -> None:
    host = demo.host()
    control = host / "domains/test/control"
    fast = readers("cat", host / "events")
    slow = open(host / "events", "rb")  # opened, never read until the end  # noqa: SIM115
    try:
        fd = os.open(control, os.O_WRONLY)
        try:
            for _ in range(600):
                os.write(fd, b"suspend\n")
                os.write(fd, b"resume\n")
        finally:
            os.close(fd)
        def all_arrived() -> None:
            assert len(fast.lines()) >= 1200
        eventually(all_arrived, 30)
        assert len(fast.events()) == 1200  # a reader that keeps up misses nothing
        os.set_blocking(slow.fileno(), True)
        got = b""
        while not got.endswith(b"\n") or b" missed " not in got:
            got += os.read(slow.fileno(), 1 << 20)
        lines = got.decode().splitlines()
    finally:
        slow.close()
    assert len(lines) == 1001
    assert all(LINE.match(line) for line in lines)
    assert lines[:1000] == fast.lines()[:1000]
    assert LINE.match(lines[-1]).groups() == ("host", "test", "missed", "200")


def test_disconnect_and_reconnect_are_events(tmp_path: Path, mount_factory, readers,
                                             monkeypatch) -> None:
    rules = tmp_path / "faults"
    rules.write_text("")
    monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
    mounted = mount_factory("test:///default")
    reader = readers("cat", mounted.host() / "events")
    rules.write_text("test:///default drop\n")
    # `xml` is asked of libvirt on open (`state` comes from the host's table): the call
    # that finds the connection dropped.
    run("cat", mounted.host() / "domains/test/xml", check=False)
    rules.write_text("")
    seen(reader, ("host", "test", "disconnected", "eof"), ("host", "test", "connected", "-"),
         timeout=10)


# -- QEMU: changes made by virsh reach the tree and the stream -----------------------------

@pytest.fixture
def qemu_guest(qemu_uri: str, tmp_path: Path):
    """(name, domain XML file) of a guest with a 16 MiB qcow2 disk, removed afterwards."""
    name = f"events-{uuid.uuid4().hex[:8]}"
    disk = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, "16M")
    document = tmp_path / f"{name}.xml"
    document.write_text(guest_xml(name, disk))
    yield name, document
    run("virsh", "-c", qemu_uri, "destroy", name, check=False, timeout=120)
    run("virsh", "-c", qemu_uri, "undefine", "--managed-save", name, check=False, timeout=120)


@pytest.mark.qemu
def test_virsh_changes_show_in_ls_cat_and_events_within_a_second(
        mount_factory, qemu_uri: str, qemu_guest, readers, tmp_path: Path) -> None:
    name, document = qemu_guest
    # Kept renderings last a minute: only libvirt's events can make the tree true in time.
    mounted = mount_factory(f"lab={qemu_uri}", options="cache_timeout=60")
    host = mounted.host("lab")
    reader = readers("cat", host / "events")
    assert name not in os.listdir(host / "domains")
    assert not (host / "domains" / name).exists()  # a missing name the kernel remembers

    def virsh(*args: str | Path) -> None:
        run("virsh", "-c", qemu_uri, *args, timeout=120)

    def within_a_second(check) -> None:
        eventually(check, timeout=1.0)

    def state_is(word: str):
        def check() -> None:
            assert (host / "domains" / name / "state").read_text() == f"{word}\n"
        return check

    def listed() -> None:
        assert name in os.listdir(host / "domains")

    def not_listed() -> None:
        assert name not in os.listdir(host / "domains")
        assert not (host / "domains" / name).exists()

    virsh("define", document)
    within_a_second(listed)
    within_a_second(state_is("shutoff"))
    virsh("start", name)
    within_a_second(state_is("running"))
    virsh("managedsave", name)
    within_a_second(state_is("shutoff"))
    assert "managed-save: yes" in (host / "domains" / name / "info").read_text()
    virsh("start", name)
    within_a_second(state_is("running"))
    # An external snapshot of the disk, merged back: a block job libvirt reports.
    virsh("snapshot-create-as", name, "--disk-only", "--no-metadata",
          "--diskspec", f"vda,file={tmp_path / 'top.qcow2'}")
    virsh("blockcommit", name, "vda", "--active", "--pivot", "--wait")
    virsh("destroy", name)
    within_a_second(state_is("shutoff"))
    virsh("undefine", "--managed-save", name)
    within_a_second(not_listed)
    seen(reader, ("domain", name, "defined", "added"), ("domain", name, "started", "booted"),
         ("domain", name, "job-completed", "save"), ("domain", name, "stopped", "saved"),
         ("domain", name, "started", "restored"),
         ("domain", name, "block-job-ready", "active-commit:vda"),
         ("domain", name, "block-job-completed", "active-commit:vda"),
         ("domain", name, "stopped", "destroyed"), ("domain", name, "undefined", "removed"))


# -- the stream without a mount -------------------------------------------------------------


def test_odd_names_are_one_field_of_one_line() -> None:
    from libvirtfs.nodes.stream import event_line, event_word
    assert event_word("my web") == "my%20web"
    assert event_word("50%") == "50%25"
    assert event_word("new\nline\ttab\r") == "new%0Aline%09tab%0D"
    assert event_word("x\u2028y\x85z") == "x%E2%80%A8y%C2%85z"  # what splitlines() splits at
    assert event_word("café/ü") == "café/ü"
    assert event_word("") == "-"
    line = event_line(0.5, "domain", "a b\nc", "started", "")
    assert line == b"1970-01-01T00:00:00.500Z domain a%20b%0Ac started -\n"
    assert len(line.decode().splitlines()) == 1


async def test_a_full_queue_drops_the_newest_and_says_how_many() -> None:
    import trio

    from libvirtfs.nodes.base import Context
    from libvirtfs.nodes.stream import EventStream, Reader, StreamFile, StreamHandle
    stream = EventStream(lambda: "lab", now=lambda: 0.0)
    small = Reader(stream, limit=2)
    stream.readers.add(small)
    handle = StreamHandle(StreamFile(Context(), stream), small)
    assert handle.stream_size() == 1
    assert await handle.read(0, 1) == b""  # within st_size: no wait (tail -f's first look)
    with trio.move_on_after(0.2) as waited:
        await handle.read(0, 4096)  # beyond it: waits for a line
    assert waited.cancelled_caught
    for n in range(5):
        stream.publish("domain", f"vm{n}", "started", "booted")
    data = await handle.read(0, 4096)
    assert data.decode().splitlines() == [
        "1970-01-01T00:00:00.000Z domain vm0 started booted",
        "1970-01-01T00:00:00.000Z domain vm1 started booted",
        "1970-01-01T00:00:00.000Z host lab missed 3"]
    assert handle.stream_size() == len(data)
    assert await handle.read(0, 20) == data[:20]  # read again after a seek back
    stream.publish("domain", "vm5", "started", "booted")
    more = await handle.read(len(data), 4096)
    assert more.endswith(b"vm5 started booted\n")
    stream.end("removed")
    at = len(data) + len(more)
    last = await handle.read(at, 4096)
    assert last.endswith(b"host lab removed -\n")
    assert await handle.read(at + len(last), 4096) == b""  # end of file, at once


def test_another_connection_s_changes_show_within_a_second(tmp_path: Path, monkeypatch,
                                                           readers) -> None:
    """test:///default lives in the process that opens it: the mount runs in this process
    (tests/inprocess.py), and a second connection of the test changes the same host."""
    import libvirt
    from inprocess import InProcessMount, allow_in_a_thread
    allow_in_a_thread(monkeypatch)
    mount = InProcessMount(tmp_path / "mnt", "test:///default", options="cache_timeout=60")
    mount.start()
    conn = libvirt.open("test:///default")
    name = f"events-{uuid.uuid4().hex[:8]}"
    try:
        domains = mount.path / "hosts/test/domains"
        reader = readers("cat", mount.path / "hosts/test/events")
        assert name not in os.listdir(domains)  # kept for a minute but for events

        def state_is(word: str):
            def check() -> None:
                assert (domains / name / "state").read_text() == f"{word}\n"
            return check

        def listed(present: bool):
            def check() -> None:
                assert (name in os.listdir(domains)) == present
            return check

        domain = conn.defineXML(GUEST.format(name=name))
        eventually(listed(True), timeout=1.0)
        eventually(state_is("shutoff"), timeout=1.0)
        domain.create()
        eventually(state_is("running"), timeout=1.0)
        domain.suspend()
        eventually(state_is("paused"), timeout=1.0)
        domain.destroy()
        eventually(state_is("shutoff"), timeout=1.0)
        domain.undefine()
        eventually(listed(False), timeout=1.0)
        seen(reader, ("domain", name, "defined", "added"), ("domain", name, "started", "booted"),
             ("domain", name, "suspended", "paused"), ("domain", name, "stopped", "destroyed"),
             ("domain", name, "undefined", "removed"))
        reader.stop()
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name).undefine()
        conn.close()
        mount.stop()


def test_each_event_comes_once_after_a_reconnect_of_a_counted_mount(
        tmp_path: Path, mount_factory, readers, monkeypatch) -> None:
    """With LIBVIRTFS_COUNT_CALLS (the benchmark's mounts) every call sees the connection
    through a counting wrapper: the connection a lost one is closed by must still undo the
    registrations made through it, or each event comes twice after a reconnect."""
    rules = tmp_path / "faults"
    rules.write_text("")
    monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
    monkeypatch.setenv("LIBVIRTFS_COUNT_CALLS", "1")
    mounted = mount_factory("test:///default")
    control = mounted.host() / "domains/test/control"
    reader = readers("cat", mounted.host() / "events")
    rules.write_text("test:///default drop\n")
    # `xml` is asked of libvirt on open (`state` comes from the host's table): the call
    # that finds the connection dropped.
    run("cat", mounted.host() / "domains/test/xml", check=False)
    rules.write_text("")
    seen(reader, ("host", "test", "connected", "-"), timeout=10)
    write_file(control, "suspend\n")
    write_file(control, "resume\n")
    seen(reader, ("domain", "test", "suspended"), ("domain", "test", "resumed"))
    time.sleep(0.5)  # a second copy of an event would be there by now
    got = [event for event in reader.events() if event[0] == "domain"]
    assert [event[2] for event in got] == ["suspended", "resumed"], got
