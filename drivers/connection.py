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

from libvirtfs.drivers import events, faults
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
        self.faults = faults.from_environment()
        # Calls that ran out of time but whose threads still wait on libvirt.  While there
        # are any, the host is taken as hung and new calls fail at once (ETIMEDOUT) instead
        # of each waiting out its own timeout: `ls -l` of a dead host must not take minutes.
        self._hung = 0
        self._hung_lock = threading.Lock()

    @property
    def connected(self) -> bool:
        """Whether a connection is open (as far as libvirt's close callback has said)."""
        return self._conn is not None

    def on_open(self, callback: Callable[[libvirt.virConnect], None]) -> None:
        """Run `callback(conn)` (in the worker thread) each time the connection is (re)opened;
        event registrations belong to one connection and must be made again after a loss."""
        self._on_open.append(callback)

    # -- in worker threads -------------------------------------------------------------

    def _open(self) -> libvirt.virConnect:
        with self._open_lock:
            if self._conn is not None:
                if self._conn.isAlive():
                    return self._conn
                log.warning("connection to %s was lost; reconnecting", self.requested_uri)
                self._conn = None
            events.ensure_event_loop()
            uri = self.requested_uri
            try:
                conn = libvirt.openReadOnly(uri) if self.read_only else libvirt.open(uri)
            except libvirt.libvirtError as e:
                # However libvirt words it (a missing socket reads as ENOENT), the host
                # cannot be reached: the objects under it are not known to be gone.
                error = from_libvirt(e)
                raise DriverError(errno.ENOTCONN, error.strerror, error.libvirt_code) from None
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
        fault = self._inject(conn, fn) if self.faults is not None else None
        try:
            result = fn(conn, *args)
        except libvirt.libvirtError as e:
            if e.get_error_code() in _CONNECTION_GONE:
                with self._open_lock:
                    if self._conn is conn:
                        self._conn = None
            raise from_libvirt(e) from None
        faults.FaultRules.apply_stall(fault)
        return result

    def _inject(self, conn: libvirt.virConnect, fn: Callable[..., Any]) -> faults.Fault | None:
        call = getattr(fn, "__qualname__", "")
        fault = self.faults.fault_for(self.requested_uri, call) if self.faults else None
        if fault is None:
            return None
        if fault.kind == "drop":
            # What libvirtd going away looks like from here: the close callback runs and
            # this connection is dead; the call at hand fails, the next one reconnects.
            self._closed(conn, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)
            conn.close()
        faults.FaultRules.apply_delay_or_error(fault)
        return fault

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
        where = self.requested_uri or "the default URI"
        if self._hung:
            raise DriverError(errno.ETIMEDOUT, f"{where} is not answering: {self._hung} "
                                               f"libvirt call(s) still wait after "
                                               f"{self.timeout:g} s")
        call = _Call()

        def in_thread() -> T:
            try:
                return self._run(fn, args)
            finally:
                with self._hung_lock:
                    call.done = True
                    if call.abandoned:
                        self._hung -= 1
                        log.info("%s answered again", where)

        try:
            with trio.fail_after(self.timeout):
                return await trio.to_thread.run_sync(
                    in_thread, limiter=self.limiter, abandon_on_cancel=True)
        except trio.TooSlowError:
            with self._hung_lock:
                if not call.done:
                    call.abandoned = True
                    self._hung += 1
            raise DriverError(errno.ETIMEDOUT,
                              f"libvirt did not answer within {self.timeout:g} s ({where})"
                              ) from None

    async def close(self) -> None:
        """Close at unmount; a hung host must not keep the process from exiting."""
        with trio.move_on_after(min(self.timeout, 5.0)):
            await trio.to_thread.run_sync(self.close_now, abandon_on_cancel=True)


class _Call:
    """Whether one call's thread has finished, or was given up on."""

    __slots__ = ("abandoned", "done")

    def __init__(self) -> None:
        self.done = False
        self.abandoned = False
