"""A libvirtfs mount served by a thread of the test process itself.

libvirt's `test:///default` host lives inside the process that opens it: a mount in a
subprocess (conftest's `mount_factory`) has a host of its own that the test cannot see.
To compare a mount with libvirt-python's view of the same host, `InProcessMount` runs
`serve()` from mount/serve.py in a thread with its own trio loop.  The test must touch the
mount only from its main thread and from subprocesses, never from the filesystem's thread.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from pathlib import Path

import trio

from libvirtfs.mount import serve as serve_module
from libvirtfs.mount.options import MountOptions
from libvirtfs.mount.serve import parse_host, serve


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _no_signals(*args: object) -> None:
    """serve() listens for SIGTERM and SIGHUP; only the main thread may, and the test
    owns that one."""
    await trio.sleep_forever()


def allow_in_a_thread(monkeypatch) -> None:
    """serve() may run outside the main thread (only there can it take signals)."""
    monkeypatch.setattr(serve_module, "_on_signals", _no_signals)


class InProcessMount:
    """`serve()` in a thread with its own trio loop, so that libvirt's in-process test host
    is the one this process sees too.  Only the main thread and subprocesses touch it."""

    def __init__(self, mountpoint: Path, uri: str, options: str = "") -> None:
        self.path = mountpoint
        self.uri = uri
        self.options = MountOptions()
        if options:
            self.options.add(options)
        self.failures: list[BaseException] = []
        self.log = _Collect()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.mkdir(exist_ok=True)
        ready = threading.Event()

        def serve_here() -> None:
            try:
                trio.run(serve, [parse_host(self.uri)], str(self.path), self.options,
                         ready.set)
            except BaseException as e:
                self.failures.append(e)
            finally:
                ready.set()

        logging.getLogger("libvirtfs").addHandler(self.log)
        self._thread = threading.Thread(target=serve_here, name="libvirtfs-mount",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(30) or self.failures:
            raise RuntimeError(f"the mount did not come up: {self.failures}")

    def stop(self) -> None:
        """Unmount as a user would, and require a clean end: no exception, no traceback."""
        try:
            if self._thread is None:
                return
            result = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True,
                                    text=True, timeout=30)
            self._thread.join(15)
            if self._thread.is_alive():
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], timeout=30)
                self._thread.join(5)
                raise AssertionError(f"the mount did not end after fusermount3 -u "
                                     f"({result.stderr.strip()})")
            assert result.returncode == 0, result.stderr
            assert not self.failures, self.failures
            errors = [self.log.format(r) for r in self.log.records if r.levelno >= logging.ERROR]
            assert not errors, "\n".join(errors)
        finally:
            logging.getLogger("libvirtfs").removeHandler(self.log)
