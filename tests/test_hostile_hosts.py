"""A hostile user of hosts/ and events: recursive deletes over hosts/, races between
writers of a pending `uri` and rmdir, odd names, huge and binary URIs, a URI that hangs,
hostile config files, crowds of readers killed at once, and the filesystem killed or
unmounted under waiting readers."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    Mounted,
    eventually,
    expect_errno,
    holding_open,
    run,
    sh,
    start_mount,
    user_error,
    write_file,
)

DEMO = "test:///default"
LIBVIRTFS = [sys.executable, "-m", "libvirtfs.mount.cli"]


def hosts(mounted: Mounted) -> list[str]:
    return sorted(os.listdir(mounted.path / "hosts"))


def echo(text: str, path: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return sh(f"echo '{text}' > '{path}'", check=False, timeout=timeout)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


class Silent:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.uri = f"qemu+tcp://127.0.0.1:{self.socket.getsockname()[1]}/system"

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def silent():
    listener = Silent()
    yield listener
    listener.close()


# -- recursive deletes over hosts/ ------------------------------------------------------------

@pytest.mark.parametrize("command", [
    "rm -rf {mnt}/hosts/", "rm -rf {mnt}/hosts/*", "find {mnt} -delete",
    "find {mnt}/hosts -mindepth 1 -delete",
    "mkdir -p {tmp}/empty && rsync -a --delete {tmp}/empty/ {mnt}/hosts/",
    "python3 -c 'import shutil; shutil.rmtree(\"{mnt}/hosts\", ignore_errors=True)'",
])
def test_recursive_deletes_of_hosts_disconnect_nothing(mount_factory, tmp_path: Path,
                                                      command: str) -> None:
    mounted = mount_factory(DEMO, f"second={DEMO}")
    os.mkdir(mounted.path / "hosts/pending")
    sh(command.format(mnt=mounted.path, tmp=tmp_path), check=False)
    assert {"second", "test"} <= set(hosts(mounted))
    for name in ("test", "second"):
        assert (mounted.host(name) / "status").read_text() == "connected\n"
        assert (mounted.host(name) / "domains/test/state").read_text() == "running\n"
    assert "detached" not in mounted.log()


# -- races on a pending host's uri ----------------------------------------------------------

def test_two_writers_of_one_pending_uri_connect_it_once(mount_factory) -> None:
    mounted = mount_factory(DEMO)
    uri = mounted.path / "hosts/new/uri"
    os.mkdir(uri.parent)
    for _ in range(5):
        writers = [subprocess.Popen(["bash", "-c", f"echo {DEMO} > {uri}"],
                                    stderr=subprocess.PIPE, text=True) for _ in range(8)]
        results = [(w.wait(timeout=20), w.stderr.read()) for w in writers]
        assert sum(1 for status, _ in results if status == 0) <= 1, results
        if (uri.parent / "status").exists():
            break
    assert (uri.parent / "status").read_text() == "connected\n"
    assert mounted.log().count("host new attached") == 1


def test_a_uri_written_after_its_folder_went_connects_nothing(mount_factory) -> None:
    mounted = mount_factory(DEMO)
    folder = mounted.path / "hosts/gone"
    os.mkdir(folder)
    fd = os.open(folder / "uri", os.O_WRONLY | os.O_TRUNC)
    try:
        os.rmdir(folder)  # a pending folder goes at once
        with pytest.raises(OSError) as caught:
            os.write(fd, f"{DEMO}\n".encode())
        assert caught.value.errno == errno.ENOENT
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert hosts(mounted) == ["test"]
    # Nothing was connected behind the user's back, and the name is free.
    assert "host gone attached" not in mounted.log()
    os.mkdir(folder)
    assert os.listdir(folder) == ["uri"]


def test_rmdir_racing_a_uri_write_leaves_no_hidden_host(mount_factory) -> None:
    mounted = mount_factory(DEMO)
    folder = mounted.path / "hosts/race"
    for _ in range(10):
        os.mkdir(folder)
        writer = subprocess.Popen(["bash", "-c", f"echo {DEMO} > {folder}/uri"],
                                  stderr=subprocess.DEVNULL)
        while writer.poll() is None:
            try:
                os.rmdir(folder)
                break
            except OSError as e:
                assert e.errno in (errno.EBUSY, errno.ENOTEMPTY), e
        writer.wait(timeout=20)
        if os.path.exists(folder):
            for _ in range(2):  # a connected host: the second plain rmdir disconnects
                try:
                    os.rmdir(folder)
                    break
                except OSError as e:
                    assert e.errno in (errno.EBUSY, errno.ENOTEMPTY), e
    assert hosts(mounted) == ["test"]
    log = mounted.log()
    assert log.count("host race attached") == log.count("host race detached"), log[-3000:]


# -- odd names, huge and binary URIs ---------------------------------------------------------

@pytest.mark.parametrize("name", ["with space", "new\nline", "50%", "x" * 255, "-rf", "é"])
def test_odd_host_names_connect_and_their_events_stay_one_line(mount_factory,
                                                              name: str) -> None:
    mounted = mount_factory(DEMO)
    folder = mounted.path / "hosts" / name
    os.mkdir(folder)
    assert name in hosts(mounted)
    write_file(folder / "uri", DEMO + "\n")
    assert (folder / "status").read_text() == "connected\n"
    with open(folder / "events", "rb", buffering=0) as events:
        os.rmdir(folder)
        last = events.read(4096)
    assert last.count(b"\n") == 1 and last.endswith(b" removed -\n"), last
    assert hosts(mounted) == ["test"]


def test_names_that_cannot_be_hosts(mount_factory) -> None:
    mounted = mount_factory(DEMO)
    hosts_dir = os.fsencode(mounted.path / "hosts")
    for name, err in [(b"x" * 256, errno.ENAMETOOLONG), (b"test", errno.EEXIST)]:
        expect_errno(err, os.mkdir, hosts_dir + b"/" + name)
    assert hosts(mounted) == ["test"]


@pytest.mark.parametrize("data", [b"x" * 10_000_000, b"\xff\xfe\x00binary\x00",
                                  b"test:///default\0", b"\x1b[2Jtest:///default",
                                  b"\n\n\n", b" " * 4096])
def test_huge_binary_or_empty_uris_are_refused_at_once(mount_factory, data: bytes) -> None:
    mounted = mount_factory(DEMO)
    uri = mounted.path / "hosts/new/uri"
    os.mkdir(uri.parent)
    began = time.monotonic()
    with pytest.raises(OSError) as caught:
        write_file(uri, data)
    assert caught.value.errno in (errno.EINVAL, errno.EFBIG), caught.value
    assert time.monotonic() - began < 5
    assert len(user_error(uri)) < 1000
    assert os.listdir(uri.parent) == ["uri"]
    assert rss_kib(mounted.process.pid) < 200_000


# -- a URI that hangs ------------------------------------------------------------------------

def test_a_hanging_uri_leaves_the_mount_responsive_and_the_writer_killable(
        mount_factory, silent: Silent) -> None:
    mounted = mount_factory(DEMO, options="timeout=60")
    folder = mounted.path / "hosts/hung"
    os.mkdir(folder)
    writer = subprocess.Popen(["bash", "-c", f"echo {silent.uri} > {folder}/uri"])
    time.sleep(1)
    began = time.monotonic()
    assert (mounted.host() / "status").read_text() == "connected\n"
    assert (mounted.host() / "domains/test/state").read_text() == "running\n"
    assert "hung" in hosts(mounted)
    expect_errno(errno.EBUSY, os.rmdir, folder)
    assert time.monotonic() - began < 2
    writer.send_signal(signal.SIGKILL)
    assert writer.wait(timeout=5) == -signal.SIGKILL
    # Killed: the folder is pending again, and goes with rmdir.
    def gone() -> None:
        os.rmdir(folder)
    eventually(lambda: gone(), timeout=10)
    assert hosts(mounted) == ["test"]


def test_unmount_with_a_hanging_uri_write_and_waiting_readers(tmp_path: Path,
                                                              silent: Silent) -> None:
    mounted = start_mount(tmp_path / "mnt", DEMO, options="timeout=60",
                          log=tmp_path / "mnt.log")
    try:
        os.mkdir(mounted.path / "hosts/hung")
        writer = subprocess.Popen(["bash", "-c", f"echo {silent.uri} > "
                                   f"{mounted.path}/hosts/hung/uri"])
        readers = [subprocess.Popen(["cat", mounted.host() / "events"],
                                    stdout=subprocess.DEVNULL) for _ in range(5)]
        time.sleep(1)
        result = run("fusermount3", "-u", mounted.path, check=False)
        assert "busy" in result.stderr
        run("fusermount3", "-u", "-z", mounted.path)
        assert mounted.process.wait(timeout=15) == 0
        assert writer.wait(timeout=5) != 0
        for reader in readers:
            assert reader.wait(timeout=5) != 0
        assert "Traceback" not in mounted.log()
    finally:
        if mounted.process.poll() is None:
            mounted.process.kill()
        run("fusermount3", "-u", "-z", mounted.path, check=False)


def test_sigterm_with_a_hanging_uri_write_exits(tmp_path: Path, silent: Silent) -> None:
    mounted = start_mount(tmp_path / "mnt", DEMO, options="timeout=60",
                          log=tmp_path / "mnt.log")
    try:
        os.mkdir(mounted.path / "hosts/hung")
        writer = subprocess.Popen(["bash", "-c", f"echo {silent.uri} > "
                                   f"{mounted.path}/hosts/hung/uri"])
        time.sleep(1)
        mounted.process.send_signal(signal.SIGTERM)
        assert mounted.process.wait(timeout=15) == 0
        assert writer.wait(timeout=5) != 0
        assert not os.path.ismount(mounted.path)
    finally:
        if mounted.process.poll() is None:
            mounted.process.kill()
        run("fusermount3", "-u", "-z", mounted.path, check=False)


def test_migrating_to_a_uri_that_hangs_fails_within_the_timeout(mount_factory,
                                                                silent: Silent) -> None:
    """A destination URI no mounted host has is opened for the migration: opening it is
    an ordinary call, bounded by -o timeout, not part of the job (job_stall cannot see
    it: libvirt has no job yet) that would hold the writer until it is killed."""
    mounted = mount_factory(DEMO, options="timeout=2")
    control = mounted.host() / "domains/test/control"
    began = time.monotonic()
    result = echo(f"migrate {silent.uri} live", control, timeout=20)
    assert result.returncode != 0 and "timed out" in result.stderr, result
    assert time.monotonic() - began < 10
    assert "did not answer" in user_error(control)
    assert (mounted.host() / "domains/test/state").read_text() == "running\n"
    assert (mounted.host() / "status").read_text() == "connected\n"
    # Nothing listens there: refused at once, as before.
    expect_errno(errno.ENOTCONN, write_file, control, "migrate qemu+tcp://127.0.0.1:1/system\n")
    assert "cannot connect to qemu+tcp://127.0.0.1:1/system" in user_error(control)


# -- hostile config files -----------------------------------------------------------------

def libvirtfs(*args: str | Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIBVIRTFS, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("text, message", [
    (b'[[host]]\nname = "caf\xe9"\nuri = "test:///default"\n', "not valid"),
    (b'\xff\xfe[[host]]\n', "not valid"),
    (b'[[host]]\nname = "a\\u0000b"\nuri = "test:///default"\n', "cannot be a folder name"),
    (b'[[host]]\nname = "' + b"x" * 300 + b'"\nuri = "test:///default"\n',
     "cannot be a folder name"),
    (b'[[host]]\nuri = "test:///default"\ntimeout = 1e400\n', "'timeout' must be"),
    (b'[[host]]\nuri = "test:///default"\ntimeout = nan\n', "'timeout' must be"),
    (b'[[host]]\nuri = "test:///default"\ntimeout = -1\n', "'timeout' must be"),
    (b'[[host]]\nuri = "test:///default"\nkeepalive_interval = -5\n', "keepalive_interval"),
    (b'[[host]]\nuri = "test:///default"\nkeepalive_count = 99999999999999999\n',
     "keepalive_count"),
    (b'[[host]]\nname = "x"\nuri = "test:///default"\n[[host]]\nname = "x"\n'
     b'uri = "test:///default"\n', "given twice"),
    (b'host = "x"\n', "'host' must be tables"),
    (b'[host]\nuri = "test:///default"\n', "'host' must be tables"),
    (b'[[host]]\nuri = ["test:///default"]\n', "'uri' must be a string"),
])
def test_a_hostile_config_file_is_one_line_and_status_2(tmp_path: Path, text: bytes,
                                                         message: str) -> None:
    config = tmp_path / "hosts.toml"
    config.write_bytes(text)
    (tmp_path / "mnt").mkdir()
    result = libvirtfs("--config", config, tmp_path / "mnt")
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("source", ["/dev/zero", "dir"])
def test_a_config_that_is_no_file(tmp_path: Path, source: str) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "mnt").mkdir()
    path = source if source.startswith("/") else tmp_path / source
    result = libvirtfs("--config", path, tmp_path / "mnt", timeout=20)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- events: crowds of readers, renames, kills -------------------------------------------------

def test_a_hundred_readers_killed_at_once_leave_the_mount_well(demo: Mounted) -> None:
    events = demo.host() / "events"
    control = demo.host() / "domains/test/control"
    before = rss_kib(demo.process.pid)
    readers = [subprocess.Popen(["cat", events], stdout=subprocess.DEVNULL)
               for _ in range(100)]
    for reader in readers:
        holding_open(reader, timeout=20)
    # Every reader waits in a read: the rest of the mount answers all the same (a `cat`
    # with a timeout, so that a frozen mount fails the test instead of hanging it).
    began = time.monotonic()
    assert run("cat", demo.host() / "status", timeout=5).stdout == "connected\n"
    assert run("ls", demo.host() / "domains", timeout=5).stdout == "test\n"
    assert time.monotonic() - began < 3
    for reader in readers:
        reader.send_signal(signal.SIGKILL)
    for reader in readers:
        assert reader.wait(timeout=10) == -signal.SIGKILL
    for _ in range(20):
        write_file(control, "suspend\n")
        write_file(control, "resume\n")
    began = time.monotonic()
    assert run("cat", demo.host() / "domains/test/state", timeout=5).stdout == "running\n"
    assert time.monotonic() - began < 2
    assert rss_kib(demo.process.pid) < before + 50_000
    # A new reader still gets what comes (after, maybe, the last resume's event, which
    # may reach the mount after the open: the state above is read without asking libvirt).
    with open(events, "rb", buffering=0) as f:
        write_file(control, "suspend\n")
        got = f.read(4096)
        for _ in range(5):
            if b" domain test suspended paused\n" in got:
                break
            got += f.read(4096)
        assert b" domain test suspended paused\n" in got
    write_file(control, "resume\n")


def test_a_reader_held_across_mv_follows_the_renamed_host(mount_factory) -> None:
    mounted = mount_factory(DEMO, f"a={DEMO}")
    with open(mounted.host("a") / "events", "rb", buffering=0) as events:
        run("mv", mounted.host("a"), mounted.path / "hosts/b")
        write_file(mounted.host("b") / "domains/test/control", "suspend\n")
        assert b" domain test suspended paused\n" in events.read(4096)
        os.rmdir(mounted.host("b"))
        rest = events.read(4096)
        while rest and not rest.endswith(b"removed -\n"):
            rest += events.read(4096)
        assert rest.endswith(b" host b removed -\n"), rest
        assert events.read(4096) == b""
    write_file(mounted.host() / "domains/test/control", "resume\n")


def test_tail_f_across_two_mounts_of_one_host(mount_factory, tmp_path: Path) -> None:
    mounted = mount_factory(DEMO, f"twin={DEMO}")
    out = tmp_path / "tail.out"
    with open(out, "wb") as sink:
        tail = subprocess.Popen(["bash", "-c", f"tail -s 0.2 -f {mounted.path}/hosts/*/events"],
                                stdout=sink)
    try:
        time.sleep(1.5)
        write_file(mounted.host() / "domains/test/control", "suspend\n")

        def both() -> None:
            text = out.read_text()
            assert "==> " + str(mounted.host("twin")) in text, text
            assert text.count("domain test suspended paused") == 2, text
        eventually(both, timeout=8)
    finally:
        tail.send_signal(signal.SIGINT)
        tail.wait(timeout=5)
        write_file(mounted.host() / "domains/test/control", "resume\n")


def test_kill_9_of_the_filesystem_ends_waiting_readers(tmp_path: Path) -> None:
    mounted = start_mount(tmp_path / "mnt", DEMO, log=tmp_path / "mnt.log")
    try:
        readers = [subprocess.Popen(["cat", mounted.host() / "events"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True) for _ in range(3)]
        grep = subprocess.Popen(["grep", "-m1", "never", mounted.host() / "events"],
                                stderr=subprocess.PIPE, text=True)
        for reader in [*readers, grep]:
            holding_open(reader)
        mounted.process.kill()
        mounted.process.wait(timeout=5)
        for reader in [*readers, grep]:
            assert reader.wait(timeout=5) not in (0, None)
            assert "Transport endpoint is not connected" in reader.stderr.read()
    finally:
        run("fusermount3", "-u", "-z", mounted.path, check=False)


def test_ctrl_c_of_grep_on_events_across_hosts(mount_factory) -> None:
    mounted = mount_factory(DEMO, f"twin={DEMO}")
    grep = subprocess.Popen(["bash", "-c", f"grep -h never {mounted.path}/hosts/*/events"],
                            start_new_session=True)
    time.sleep(1)
    os.killpg(grep.pid, signal.SIGINT)
    assert grep.wait(timeout=3) != 0


def test_a_reader_that_never_reads_while_thousands_of_events_come(demo: Mounted) -> None:
    control = demo.host() / "domains/test/control"
    events = os.open(demo.host() / "events", os.O_RDONLY)
    try:
        before = rss_kib(demo.process.pid)
        fd = os.open(control, os.O_WRONLY)
        try:
            for _ in range(2500):
                os.write(fd, b"suspend\n")
                os.write(fd, b"resume\n")
        finally:
            os.close(fd)
        assert rss_kib(demo.process.pid) < before + 30_000
        data = b""
        while b" missed " not in data:
            data += os.read(events, 1 << 20)
        lines = data.splitlines()
        assert len(lines) == 1001
        # Events reach the mount a moment after the writes that caused them: the last
        # few may come after the reader caught up, as lines of their own.  None is lost.
        missed = int(lines[-1].rsplit(b" ", 1)[1])
        assert lines[-1].endswith(b" host test missed %d" % missed)
        later = 5000 - 1000 - missed
        assert 0 <= later <= 10
        while len(data.splitlines()) < 1001 + later:
            data += os.read(events, 1 << 20)
        assert len(data.splitlines()) == 1001 + later
    finally:
        os.close(events)


# -- rmdir racing rmdir and mv -----------------------------------------------------------------

def test_two_rmdirs_of_one_host_at_once_disconnect_it_once(mount_factory) -> None:
    mounted = mount_factory(DEMO, *(f"h{i}={DEMO}" for i in range(8)))
    readers = {i: open(mounted.host(f"h{i}") / "events", "rb", buffering=0)  # noqa: SIM115
               for i in range(8)}
    try:
        script = " ".join(f"rmdir {mounted.host(f'h{i}')} & rmdir {mounted.host(f'h{i}')} &"
                          for i in range(8))
        sh(script + " wait", check=False)
        assert hosts(mounted) == ["test"]
        for i, reader in readers.items():
            lines = b""
            while chunk := reader.read(4096):
                lines += chunk
            assert lines.count(b" removed -\n") == 1, (i, lines)
        assert mounted.log().count("detached") == 8
    finally:
        for reader in readers.values():
            reader.close()


def test_mv_racing_rmdir_leaves_no_disconnected_host_behind(mount_factory) -> None:
    mounted = mount_factory(DEMO, *(f"h{i}={DEMO}" for i in range(8)))
    script = " ".join(f"rmdir {mounted.host(f'h{i}')} & mv {mounted.host(f'h{i}')} "
                      f"{mounted.path}/hosts/m{i} &" for i in range(8))
    sh(script + " wait", check=False)
    for name in hosts(mounted):
        assert (mounted.host(name) / "status").read_text() == "connected\n", name


def test_tail_f_gets_the_last_line_when_its_host_is_removed(mount_factory,
                                                          tmp_path: Path) -> None:
    mounted = mount_factory(DEMO, f"twin={DEMO}")
    result = sh(f"(sleep 1.5; rmdir {mounted.host('twin')}) & "
                f"timeout 4 tail -s 0.2 -f {mounted.host('twin')}/events", check=False)
    assert "No such file" not in result.stderr, result.stderr
    assert result.stdout.endswith(" host twin removed -\n"), result
