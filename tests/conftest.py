"""Fixtures: real libvirtfs mounts in a separate process, driven by real tools.

A mount runs `libvirtfs -f` as a subprocess (the test process must never touch a mount
served by its own thread).  Teardown unmounts with `fusermount3 -u`, requires exit status 0,
and fails the test if the filesystem logged a traceback.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xattr

REPO = Path(__file__).resolve().parent.parent

QEMU_URI = os.environ.get("LIBVIRTFS_QEMU_URI", "")
# pytestmark of a module whose tests all need the real libvirtd with QEMU.
QEMU_ONLY = [
    pytest.mark.qemu,
    pytest.mark.skipif(not QEMU_URI, reason="LIBVIRTFS_QEMU_URI is not set: start the real "
                                            "libvirtd with `bash contrib/qemu-testbed.sh start` "
                                            "and set it to qemu:///system"),
]


def guest_xml(name: str, disk: str | os.PathLike, *, hypervisor: str = "qemu", mib: int = 64,
              target: str = "vda", description: str | None = None) -> str:
    """A domain with no OS and one file disk at `target`, to define by `cp` or virsh.

    With QEMU (the default) it is the test bed's smallest guest: 64 MiB, SeaBIOS running
    forever, and a qcow2 disk (16 MiB is enough), which internal snapshots need.  With
    hypervisor="test" the same shape for libvirt's test driver (no arch, no disk driver)."""
    qemu = hypervisor == "qemu"
    arch = " arch='x86_64'" if qemu else ""
    driver = "\n      <driver name='qemu' type='qcow2'/>" if qemu else ""
    about = f"\n  <description>{description}</description>" if description is not None else ""
    return f"""<domain type='{hypervisor}'>
  <name>{name}</name>{about}
  <memory unit='MiB'>{mib}</memory>
  <os><type{arch}>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>{driver}
      <source file='{disk}'/>
      <target dev='{target}' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def run(*command: str | os.PathLike, check: bool = True, cwd: str | os.PathLike | None = None,
        input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a shell tool the way a user would; returns its completed process."""
    return subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          check=check, cwd=cwd, input=input, timeout=timeout)


def sh(script: str, *, check: bool = True, cwd: str | os.PathLike | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a line of shell, as typed at a prompt."""
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=check,
                          cwd=cwd, timeout=timeout)


def info(path: Path) -> dict[str, str]:
    """An `info` file's `key: value` lines."""
    return dict(line.split(": ", 1) for line in path.read_text().splitlines())


def user_error(path: Path) -> str:
    """`getfattr -n user.error PATH`: why the last change of PATH was refused."""
    return xattr.getxattr(str(path), "user.error").decode()


def write_file(path: Path, data: str | bytes) -> None:
    """Python file I/O: errors surface at close()."""
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode) as f:
        f.write(data)


def expect_errno(err: int, fn, *args) -> OSError:
    """Call fn(*args), which must fail with errno `err`."""
    with pytest.raises(OSError) as caught:
        fn(*args)
    assert caught.value.errno == err, caught.value
    return caught.value


def eventually(check, timeout: float = 5.0):
    """Retry `check` until it passes: a mount shows changes made elsewhere within its
    documented cache time (1 s by default), sooner when libvirt sends an event.

    `check` passes when it neither raises AssertionError nor returns exactly False: a
    lambda that compares (`lambda: a == b`) returns a bool, and passing on False would make
    the wait a silent no-op.  Its result is returned."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        else:
            if result is not False:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"still False after {timeout} s: {_described(check)}")
        time.sleep(0.1)


def _described(check) -> str:
    """What `check` tests, for a failure message: its source where Python has it."""
    try:
        return inspect.getsource(check).strip()
    except (OSError, TypeError):
        return repr(check)


def holding_open(process: subprocess.Popen, name: str = "events", count: int = 1,
                 timeout: float = 10.0) -> None:
    """Wait until `process` holds `count` files called `name` open (its /proc/PID/fd), or
    has ended: a reader of an events file gets every line from its open on, so this is
    the moment a test may make the events it expects (a fixed sleep is too short on a
    loaded machine, and too long on a quiet one)."""
    def opened() -> None:
        if process.poll() is not None:
            return
        held = 0
        with contextlib.suppress(FileNotFoundError):
            for fd in os.listdir(f"/proc/{process.pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{process.pid}/fd/{fd}").endswith(f"/{name}"):
                        held += 1
        assert held >= count, f"{process.args} holds {held} of {count} {name} files open"
    eventually(opened, timeout=timeout)


def libvirtd_clients_of(pid: int) -> int:
    """How many connections the local libvirtd serves for process `pid` (virt-admin, over
    libvirtd's admin socket)."""
    admin = ("virt-admin", "-c", "libvirtd:///system")
    listing = run(*admin, "client-list", "libvirtd").stdout
    count = 0
    for line in listing.splitlines()[2:]:
        if not line.strip():
            continue
        info = run(*admin, "client-info", "libvirtd", line.split()[0], check=False).stdout
        fields = dict(part.split(":", 1) for part in info.splitlines() if ":" in part)
        if fields.get("unix_process_id", "").strip() == str(pid):
            count += 1
    return count


class Mounted:
    """One running libvirtfs process and its mount point."""

    def __init__(self, mountpoint: Path, process: subprocess.Popen, log: Path) -> None:
        self.path = mountpoint
        self.process = process
        self.log_path = log

    def host(self, name: str = "test") -> Path:
        return self.path / "hosts" / name

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def unmount(self) -> int:
        if os.path.ismount(self.path):
            result = run("fusermount3", "-u", self.path, check=False)
            if result.returncode:
                print(f"fusermount3 -u {self.path}: {result.stderr}")
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            py_spy = Path(sys.executable).parent / "py-spy"  # where installed, say where it hung
            if py_spy.exists():
                print(run(py_spy, "dump", "--pid", str(self.process.pid), check=False).stdout)
            self.process.kill()
            run("fusermount3", "-u", "-z", self.path, check=False)
            return self.process.wait(timeout=5)


def start_mount(mountpoint: Path, *targets: str, options: str = "", log: Path,
                extra: tuple[str, ...] = ()) -> Mounted:
    mountpoint.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "libvirtfs.mount.cli", "-f", "--debug", *extra,
               *targets, str(mountpoint)]
    if options:
        command += ["-o", options]
    logfile = open(log, "wb")  # noqa: SIM115 - the child writes it for its whole life
    process = subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    logfile.close()
    deadline = time.monotonic() + 30
    while not os.path.ismount(mountpoint):
        if process.poll() is not None:
            raise RuntimeError(f"libvirtfs exited with {process.returncode}:\n"
                               + log.read_text(errors="replace"))
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("libvirtfs did not mount within 30 s:\n" + log.read_text())
        time.sleep(0.01)  # a stat a time: the mount comes in half a second, used by every test
    return Mounted(mountpoint, process, log)


def check_clean_exit(mounted: Mounted) -> None:
    status = mounted.unmount()
    text = mounted.log()
    assert status == 0, f"libvirtfs exited with status {status}:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-5000:]
    assert "unexpected error" not in text, text[-5000:]


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator:
    """mount_factory(*targets, options='') -> Mounted; all are unmounted and checked after."""
    mounts: list[Mounted] = []

    def factory(*targets: str, options: str = "", name: str = "mnt",
                extra: tuple[str, ...] = ()) -> Mounted:
        mounted = start_mount(tmp_path / name, *targets, options=options,
                              log=tmp_path / f"{name}.log", extra=extra)
        mounts.append(mounted)
        return mounted

    yield factory
    for mounted in mounts:
        check_clean_exit(mounted)


@pytest.fixture
def demo(mount_factory) -> Mounted:
    """test:///default mounted at a fresh folder: one running domain `test`."""
    return mount_factory("test:///default")


@pytest.fixture(scope="session")
def big_host_xml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test:/// host with 1,000 domains, and a few with names that need escaping."""
    path = tmp_path_factory.mktemp("fixtures") / "big-host.xml"
    domains = [f"vm-{i:04d}" for i in range(1000)] + [".", "..", "per%cent", "tab\tname"]
    parts = ["<node>",
             "<cpu><mhz>2000</mhz><model>i686</model><active>4</active><nodes>1</nodes>"
             "<sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>",
             "<memory>8388608</memory>"]
    for name in domains:
        escaped = name.replace("&", "&amp;").replace("<", "&lt;").replace("\t", "&#9;")
        parts.append(f"<domain type='test'><name>{escaped}</name><memory>65536</memory>"
                     f"<vcpu>1</vcpu><os><type>hvm</type></os></domain>")
    parts.append("</node>")
    path.write_text("\n".join(parts))
    return path


@pytest.fixture
def big(mount_factory, big_host_xml: Path) -> Mounted:
    return mount_factory(f"big=test://{big_host_xml}")


def stop_signal(mounted: Mounted, signum: int = signal.SIGTERM) -> int:
    mounted.process.send_signal(signum)
    return mounted.process.wait(timeout=15)


@pytest.fixture(scope="session")
def qemu_uri() -> str:
    """The real libvirtd with QEMU that contrib/test.sh starts (contrib/qemu-testbed.sh)."""
    uri = os.environ.get("LIBVIRTFS_QEMU_URI")
    if not uri:
        pytest.skip("no real libvirtd: run contrib/test.sh, or start contrib/qemu-testbed.sh "
                    "and set LIBVIRTFS_QEMU_URI=qemu:///system")
    return uri
