"""Running blocking libvirt calls off the trio loop, one limiter and one timeout per host.

Every call goes through `Connection.call`: a worker thread (`trio.to_thread.run_sync`) under
this host's own `CapacityLimiter`, bounded by `timeout` seconds.  A call that runs out is
abandoned (its thread finishes on its own and keeps holding its limiter token, so a dead
host can only exhaust its own limiter) and the caller gets ETIMEDOUT.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt
import trio

from libvirtfs.drivers import events
from libvirtfs.drivers.errors import DriverError, from_libvirt

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors after which the connection object is useless and must be opened again.
_CONNECTION_GONE = {
    getattr(libvirt, name)
    for name in ("VIR_ERR_NO_CONNECT", "VIR_ERR_INVALID_CONN", "VIR_ERR_RPC")
    if hasattr(libvirt, name)
}


class Connection:
    """One libvirt connection, opened lazily in a worker thread and reopened after a loss."""

    def __init__(self, uri: str | None, *, timeout: float = 30.0, read_only: bool = False,
                 max_threads: int = 4) -> None:
        self.requested_uri = uri
        self.timeout = timeout
        self.read_only = read_only
        self.limiter = trio.CapacityLimiter(max_threads)
        self._conn: libvirt.virConnect | None = None
        self._open_lock = threading.Lock()
        self._on_open: list[Callable[[libvirt.virConnect], None]] = []

    def on_open(self, callback: Callable[[libvirt.virConnect], None]) -> None:
        """Run `callback(conn)` (in the worker thread) each time the connection is (re)opened;
        event registrations belong to one connection and must be made again after a loss."""
        self._on_open.append(callback)

    # -- in worker threads -------------------------------------------------------------

    def _open(self) -> libvirt.virConnect:
        with self._open_lock:
            if self._conn is not None:
                return self._conn
            events.ensure_event_loop()
            uri = self.requested_uri
            try:
                conn = libvirt.openReadOnly(uri) if self.read_only else libvirt.open(uri)
            except libvirt.libvirtError as e:
                raise from_libvirt(e) from None
            with contextlib.suppress(libvirt.libvirtError):
                conn.setKeepAlive(5, 3)  # local drivers have none; nothing to do
            with contextlib.suppress(libvirt.libvirtError):
                conn.registerCloseCallback(self._closed, None)
            self._conn = conn
            for callback in self._on_open:
                try:
                    callback(conn)
                except libvirt.libvirtError as e:
                    log.warning("%s: %s", uri, e.get_error_message())
            return conn

    def _closed(self, conn: libvirt.virConnect, reason: int, opaque: object) -> None:
        log.warning("connection to %s closed (reason %d)", self.requested_uri, reason)
        with self._open_lock:
            if self._conn is conn:
                self._conn = None

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self._open()
        try:
            return fn(conn, *args)
        except libvirt.libvirtError as e:
            if e.get_error_code() in _CONNECTION_GONE:
                with self._open_lock:
                    if self._conn is conn:
                        self._conn = None
            raise from_libvirt(e) from None

    def close_now(self) -> None:
        """Close the connection (blocking; for shutdown)."""
        with self._open_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    # -- on the trio loop --------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(conn, *args)` in a worker thread; DriverError on failure or timeout."""
        name = getattr(fn, "__name__", "call")
        try:
            with trio.fail_after(self.timeout):
                return await trio.to_thread.run_sync(
                    self._run, fn, args, limiter=self.limiter, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise DriverError(
                errno.ETIMEDOUT,
                f"libvirt did not answer {name} within {self.timeout:g} s "
                f"({self.requested_uri or 'default URI'})") from None

    async def close(self) -> None:
        await trio.to_thread.run_sync(self.close_now, abandon_on_cancel=True)
