"""Nothing hangs: stalls end by themselves, one slow object is only slow itself, late
outcomes are told, long handlers end at unmount, and bad timeouts are refused.

Faults come from drivers/faults.py around the real test driver (LIBVIRTFS_FAULTS).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirt
import pytest
from conftest import Mounted, check_clean_exit, run, sh, start_mount, user_error
from inprocess import InProcessMount, allow_in_a_thread

LIBVIRTFS = [sys.executable, "-m", "libvirtfs.mount.cli"]

DOMAIN = ("<domain type='test'><name>{}</name><memory>65536</memory>"
          "<os><type>hvm</type></os></domain>")
CALLERS = [f"d{n:02d}" for n in range(16)]
HOST_XML = "\n".join([
    "<node>",
    *(DOMAIN.format(name) for name in ["vm", "slow", *CALLERS]),
    "<pool type='dir'><name>p</name><target><path>/hangs-p</path></target></pool>",
    "</node>"])


class Sick:
    """A mount of one test:/// host whose faults a test writes into `rules`."""

    def __init__(self, mounted: Mounted, rules: Path, uri: str) -> None:
        self.mounted, self.rules, self.uri = mounted, rules, uri

    def fault(self, rule: str) -> None:
        self.rules.write_text(f"{self.uri} {rule}\n")

    def heal(self) -> None:
        self.rules.unlink(missing_ok=True)

    def path(self, relative: str) -> Path:
        return self.mounted.host("sick") / relative


@pytest.fixture
def sick_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    made: list[Sick] = []

    def factory(options: str = "timeout=1,cache_timeout=0") -> Sick:
        host_xml = tmp_path / "sick.xml"
        host_xml.write_text(HOST_XML)
        rules = tmp_path / "faults"
        monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
        uri = f"test://{host_xml}"
        mounted = start_mount(tmp_path / "mnt", f"sick={uri}", options=options,
                              log=tmp_path / "log")
        made.append(Sick(mounted, rules, uri))
        return made[-1]

    yield factory
    for sick in made:
        sick.heal()
        check_clean_exit(sick.mounted)


@pytest.fixture
def sick(sick_factory) -> Sick:
    return sick_factory()


def read_errno(path: Path) -> int:
    try:
        path.read_text()
    except OSError as e:
        return e.errno or 0
    return 0


def until(check, timeout: float = 10.0):
    """Retry `check` (failing with AssertionError or OSError) until it passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            assert result is not False
            return result
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def write_errno(path: Path, text: str) -> int:
    try:
        path.write_text(text)
    except OSError as e:
        return e.errno or 0
    return 0


def test_a_stall_of_16_callers_ends_by_itself(sick_factory) -> None:
    sick = sick_factory("timeout=1,cache_timeout=60")
    controls = [sick.path(f"domains/{name}/control") for name in CALLERS]
    for control in controls:
        assert "suspend" in control.read_text()
    sick.fault("delay 3")  # libvirtd stalls for longer than the timeout
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(write_errno, controls, ["suspend\n"] * 16))
    assert results == [errno.ETIMEDOUT] * 16
    until(lambda: "is not answering" in sick.mounted.log())  # the liveness probe's verdict
    sick.heal()
    # No remount: once libvirtd answers again, so does the mount.
    until(lambda: "<name>vm</name>" in sick.path("domains/vm/live.xml").read_text())
    assert "answered again" in sick.mounted.log()


def test_one_slow_domain_leaves_the_rest_of_the_host_answering(sick: Sick) -> None:
    assert sick.path("domains/slow/state").read_text() == "running\n"
    sick.fault("delay 4 on=slow")  # every call on domain `slow` is stuck, as a QEMU monitor
    with ThreadPoolExecutor(16) as pool:
        stuck = [pool.submit(read_errno, sick.path(f"domains/slow/{name}"))
                 for name in ["state", "info", "xml", "live.xml", "control", "autostart"] * 2]
        time.sleep(1.5)  # all of them have timed out once by now
        started = time.monotonic()
        for _ in range(10):
            assert sick.path("domains/vm/state").read_text() == "running\n"
            assert "vm" in os.listdir(sick.path("domains"))
        assert time.monotonic() - started < 2
        assert {f.result() for f in stuck} == {errno.ETIMEDOUT}
    assert "is not answering" not in sick.mounted.log()


def test_a_change_that_lands_after_its_timeout_is_logged_and_shown(sick_factory) -> None:
    sick = sick_factory("timeout=1,cache_timeout=60")
    state, control = sick.path("pools/p/state"), sick.path("pools/p/control")
    assert state.read_text() == "running\n"
    assert "stop" in control.read_text()
    sick.fault("delay 3")
    started = time.monotonic()
    fd = os.open(control, os.O_WRONLY | os.O_TRUNC)
    try:
        with pytest.raises(OSError) as caught:
            os.write(fd, b"stop\n")  # echo stop > control
        assert caught.value.errno == errno.ETIMEDOUT
    finally:
        os.close(fd)
    assert time.monotonic() - started < 2.5
    sick.heal()
    # libvirt carries the abandoned call out later: the log says so, and the tree shows
    # it although its renderings were cached for a minute.
    until(lambda: state.read_text() == "inactive\n")
    until(lambda: ("pool stop" in sick.mounted.log()
                   and "succeeded after it had timed out" in sick.mounted.log()))


# -- wait's seconds ---------------------------------------------------------------------


@pytest.mark.parametrize("seconds", ["inf", "nan", "-1", "3601", "1e9", "-inf"])
def test_wait_refuses_unbounded_or_negative_seconds(demo: Mounted, seconds: str) -> None:
    control = demo.host() / "domains/test/control"
    started = time.monotonic()
    result = sh(f"echo 'wait shutoff {seconds}' > {control}", check=False)
    assert result.returncode != 0
    assert "Invalid argument" in result.stderr
    assert time.monotonic() - started < 5
    message = user_error(control)
    assert seconds in message and "3600" in message


# -- -o timeout= and cache_timeout= -----------------------------------------------------


@pytest.mark.parametrize("option", [
    "timeout=nan", "timeout=inf", "timeout=0", "timeout=-1", "timeout=86401",
    "cache_timeout=nan", "cache_timeout=inf", "cache_timeout=-1", "cache_timeout=86401",
    "job_stall=0", "job_stall=nan", "job_stall=forever"])
def test_bad_timeouts_are_option_errors(tmp_path: Path, option: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run(*LIBVIRTFS, "-f", "test:///default", mnt, "-o", option, check=False,
                 timeout=20)
    assert result.returncode == 2, result.stderr
    assert option.split("=")[0] in result.stderr and "Traceback" not in result.stderr
    assert not os.path.ismount(mnt)


# -- the background process -------------------------------------------------------------


def test_background_process_leaves_the_working_folder(tmp_path: Path) -> None:
    mnt = tmp_path / "hangs-cwd-mnt"
    mnt.mkdir()
    result = run(*LIBVIRTFS, "test:///default", mnt.name, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    try:
        # Started from tmp_path with a relative mount point; it holds no folder busy.
        found = sh(f"pgrep -f 'libvirtfs.mount.cli test:///default {mnt.name} -f'",
                   check=False).stdout.split()
        assert len(found) == 1, found
        assert os.readlink(f"/proc/{found[0]}/cwd") == "/"
        assert (mnt / "hosts/test/domains/test/state").read_text() == "running\n"
    finally:
        assert run("fusermount3", "-u", mnt, check=False).returncode == 0


def test_background_mount_failure_tells_its_reason(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # The kernel refuses this block size; libfuse says why on the child's stderr.
    result = run(*LIBVIRTFS, "test:///default", mnt, "-o", "blksize=7", check=False,
                 timeout=20)
    assert result.returncode != 0
    assert f"cannot mount at {mnt}" in result.stderr
    assert "Invalid argument" in result.stderr
    assert not os.path.ismount(mnt)


# -- thread dumps -----------------------------------------------------------------------


def test_sigusr1_dumps_every_thread_into_the_log(demo: Mounted) -> None:
    assert (demo.host() / "domains/test/state").read_text() == "running\n"
    demo.process.send_signal(signal.SIGUSR1)
    until(lambda: "libvirt-events" in demo.log() or "Thread 0x" in demo.log())
    assert "File " in demo.log()
    # The mount carries on.
    assert (demo.host() / "domains/test/state").read_text() == "running\n"
    assert demo.process.poll() is None


# -- a pending wait and the other words of the same domain ------------------------------


def test_a_pending_wait_does_not_hold_up_another_shells_destroy(demo: Mounted) -> None:
    control = demo.host() / "domains/test/control"
    waiting = subprocess.Popen(["bash", "-c", f"echo 'wait shutoff 20' > {control}"],
                               stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert waiting.poll() is None  # it waits
        started = time.monotonic()
        sh(f"echo destroy > {control}", timeout=30)
        assert time.monotonic() - started < 1.0
        assert waiting.wait(timeout=5) == 0, waiting.stderr.read()  # and then it is over
    finally:
        waiting.kill()
        waiting.wait()
    assert (demo.host() / "domains/test/state").read_text() == "shutoff\n"
    # One program still sees one file: tools stat a name, then open it, and compare.
    inode = os.stat(control).st_ino
    fd = os.open(control, os.O_WRONLY)
    try:
        assert os.fstat(fd).st_ino == inode == os.stat(control).st_ino
    finally:
        os.close(fd)


# -- unmounting ends long handlers ------------------------------------------------------


@pytest.fixture
def waiter(demo: Mounted):
    """A shell running `echo 'wait shutoff 3000' > control`, and a way to stop it."""
    control = demo.host() / "domains/test/control"
    waiting = subprocess.Popen(["bash", "-c", f"echo 'wait shutoff 3000' > {control}"],
                               stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert waiting.poll() is None
    yield waiting
    if waiting.poll() is None:
        # The test failed: leave no unkillable shell behind.
        demo.process.kill()
        run("fusermount3", "-u", "-z", demo.path, check=False)
    waiting.kill()
    waiting.wait()


def test_sigterm_ends_a_pending_wait_with_an_error(demo: Mounted, waiter) -> None:
    started = time.monotonic()
    demo.process.send_signal(signal.SIGTERM)
    assert waiter.wait(timeout=10) != 0
    assert "Operation canceled" in waiter.stderr.read()
    assert demo.process.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert not os.path.ismount(demo.path)
    assert "Traceback" not in demo.log()


def test_lazy_unmount_ends_a_pending_wait(demo: Mounted, waiter) -> None:
    started = time.monotonic()
    run("fusermount3", "-u", "-z", demo.path)
    assert waiter.wait(timeout=10) != 0
    assert "Operation canceled" in waiter.stderr.read()
    assert demo.process.wait(timeout=10) == 0
    assert time.monotonic() - started < 5


def test_a_killed_writer_dies_at_once(demo: Mounted, waiter) -> None:
    started = time.monotonic()
    waiter.kill()  # kill -9 of the shell doing the wait
    waiter.wait(timeout=10)
    assert time.monotonic() - started < 3
    # The mount carries on.
    assert (demo.host() / "domains/test/state").read_text() == "running\n"


# -- a connection dropped in the middle of 16 defines -----------------------------------


def libvirt_names(conn: libvirt.virConnect) -> dict[str, set[str]]:
    return {"domains": {d.name() for d in conn.listAllDomains()},
            "pools": {p.name() for p in conn.listAllStoragePools()},
            "networks": {n.name() for n in conn.listAllNetworks()}}


def tree_names(host: Path) -> dict[str, set[str]]:
    return {folder: set(os.listdir(host / folder)) for folder in ("domains", "pools",
                                                                    "networks")}


def test_a_connection_dropped_mid_define_of_16_callers(tmp_path: Path, monkeypatch) -> None:
    allow_in_a_thread(monkeypatch)
    rules = tmp_path / "faults"
    monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
    uri = "test:///default"
    conn = libvirt.open(uri)  # the same in-process host the mount serves
    names = [f"hangs-drop-{n:02d}" for n in range(16)]
    mount = InProcessMount(tmp_path / "mnt", uri, options="timeout=5,cache_timeout=0")
    mount.start()
    try:
        host = mount.path / "hosts/test"
        assert tree_names(host) == libvirt_names(conn)
        rules.write_text(f"{uri} drop 0 define\n")  # under the first define that comes
        callers = []
        for name in names:
            (tmp_path / name).write_text(DOMAIN.format(name))
            folder = host / "domains" / name
            # What a user types; a refused definition leaves no pending folder behind.
            callers.append(subprocess.Popen(
                ["bash", "-c", f"mkdir {folder} && cp {tmp_path / name} {folder}/xml "
                               f"|| {{ rmdir {folder}; exit 1; }}"],
                stderr=subprocess.PIPE, text=True))
        failed = [name for name, caller in zip(names, callers, strict=True)
                  if caller.wait(timeout=60) != 0]
        assert failed, "the dropped connection failed nobody's define"
        # The host answers again by itself, and the tree is libvirt's view.
        until(lambda: tree_names(host) == libvirt_names(conn))
        assert set(names) - set(failed) <= libvirt_names(conn)["domains"]
        assert "connection to test:///default closed" in "\n".join(
            mount.log.format(r) for r in mount.log.records)
    finally:
        rules.unlink(missing_ok=True)
        mount.stop()
        for dom in conn.listAllDomains():
            if dom.name().startswith("hangs-drop-"):
                dom.undefine()
        conn.close()


def test_python_buffered_close_never_carries_out_a_refused_word_again(sick):
    """Python's buffered file keeps the bytes of a failed write and writes them again at
    close(): by then libvirt may take the word, and a managed-save or a migration would
    run that the program was told had failed."""
    control = sick.path("domains/vm/control")
    sick.fault("error 5 _on")  # the control word's own libvirt call fails
    f = open(control, "w")  # noqa: SIM115 - the close is the point of the test
    f.write("suspend\n")
    with pytest.raises(OSError) as refused:
        f.flush()
    assert refused.value.errno == errno.EIO
    sick.heal()
    with pytest.raises(OSError) as again:
        f.close()
    assert again.value.errno == errno.EIO
    assert sick.path("domains/vm/state").read_text() == "running\n"
    control.write_text("suspend\n")  # a new open carries the word out
    assert sick.path("domains/vm/state").read_text() == "paused\n"
