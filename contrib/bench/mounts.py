"""Mounting the contenders as separate processes, reading their counters and memory."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VENV_BIN = REPO / ".venv" / "bin"


class Mount:
    """One filesystem process and its mount point; `domains` is the folder the workloads
    run in."""

    def __init__(self, kind: str, path: Path, process: subprocess.Popen, host: str,
                 log: Path) -> None:
        self.kind = kind
        self.path = path
        self.process = process
        self.host = host
        self.log = log

    @property
    def domains(self) -> Path:
        return self.path / "hosts" / self.host / "domains"

    def counters(self) -> dict[str, int]:
        text = os.getxattr(self.path, "user.counters").decode()
        return {name: int(n) for name, n in (line.split() for line in text.splitlines())}

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM of the filesystem process, in kB."""
        found = {}
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0])
        return found

    def unmount(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
            self.process.wait(timeout=10)
        with contextlib.suppress(OSError):
            self.path.rmdir()


def _wait_ready(mount: Mount, timeout: float = 300) -> Mount:
    """Mounted, and the host's folder answers (`status` reads `connected`)."""
    try:
        return _wait(mount, timeout)
    except BaseException:  # interrupted (Ctrl-C) or failed: leave nothing mounted
        mount.process.kill()
        mount.unmount()
        raise


def _wait(mount: Mount, timeout: float) -> Mount:
    deadline = time.monotonic() + timeout
    status = mount.path / "hosts" / mount.host / "status"
    while True:
        if mount.process.poll() is not None:
            raise RuntimeError(f"{mount.kind} exited with {mount.process.returncode}: "
                               + mount.log.read_text(errors="replace")[-2000:])
        if os.path.ismount(mount.path):
            try:
                if status.read_text().strip() == "connected":
                    return mount
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mount.kind} did not come up within {timeout:g} s")
        time.sleep(0.02)


def _folder(work: Path, kind: str) -> Path:
    path = work / f"bench-mnt-{kind}-{time.monotonic_ns()}"
    path.mkdir()
    return path


def mount_null(work: Path, names: str, count: int, host: str, cache_timeout: float) -> Mount:
    path = _folder(work, "null")
    log = path.with_suffix(".log")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(HERE / "nullfs.py"), "--domains", str(count), "--names", names,
             "--host", host, "--cache-timeout", str(cache_timeout), str(path)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return _wait_ready(Mount("null", path, process, host, log))


def mount_libvirtfs(work: Path, uri: str, host: str, cache_timeout: float) -> Mount:
    """`libvirtfs -f NAME=URI MNT -o cache_timeout=...`, as a user runs it, with
    LIBVIRTFS_COUNT_CALLS=1 so that its libvirt calls are counted."""
    path = _folder(work, "libvirtfs")
    log = path.with_suffix(".log")
    env = dict(os.environ, LIBVIRTFS_COUNT_CALLS="1")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(VENV_BIN / "libvirtfs"), "-f", f"{host}={uri}", str(path),
             "-o", f"cache_timeout={cache_timeout:g}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return _wait_ready(Mount("libvirtfs", path, process, host, log))
