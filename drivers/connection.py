"""Running blocking libvirt calls off the trio loop, with a timeout and a liveness verdict
per host.

Every call goes through `Connection.call`: a worker thread (`trio.to_thread.run_sync`),
at most `max_threads` calls of one host at once, each bounded by `timeout` seconds.  A
call that runs out is abandoned and the caller gets ETIMEDOUT; its thread finishes on its
own, and what it did then is logged and makes the host's tree be read afresh (`on_late`):
libvirt may well have carried the change out after all.

One slow call says nothing about the host: a QEMU monitor stuck on one domain blocks only
the calls on that domain.  So an abandoned call gives back its slot at once (its thread
counts against a separate, bounded allowance), and whether the whole host is hung is
decided by a cheap probe on the same connection (`getLibVersion`, answered by the daemon
itself), run when a call times out.  Only while a probe goes unanswered do calls fail at
once instead of each waiting out its timeout.

A connection is taken as lost only when libvirt says so (`isAlive()`, the close
callback), not on any RPC error: one oversized message fails alone.  A lost connection is
closed, its event callbacks deregistered first, before the next one is opened; otherwise
libvirtd keeps serving it, and its events, for as long as the mount lives.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import libvirt
import trio

from libvirtfs.drivers import counting, credentials, events, eventwords, faults
from libvirtfs.drivers.errors import DriverError, from_libvirt

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors after which the connection may be gone; `isAlive()` decides.
_CONNECTION_GONE = {
    getattr(libvirt, name)
    for name in ("VIR_ERR_NO_CONNECT", "VIR_ERR_INVALID_CONN", "VIR_ERR_RPC",
                 "VIR_ERR_SYSTEM_ERROR")
    if hasattr(libvirt, name)
}

# Threads of abandoned calls one host may have at once (blocked on a socket, they cost
# little); beyond it, calls fail at once rather than pile up threads without end.
MAX_ABANDONED = 64
# How long the liveness probe may take before the host counts as hung.
PROBE_SECONDS = 5.0
# While one call waits, another running longer than this makes the watcher probe.
KICK_SECONDS = 0.1
# Long calls (jobs) one host may run at once.
MAX_LONG_CALLS = 32

# libvirt's own default for remote connections: a ping every 5 s, lost after 3 unanswered.
DEFAULT_KEEPALIVE = (5, 3)

OnOpen = Callable[[libvirt.virConnect], None]
OnClose = Callable[[libvirt.virConnect], None]


class Connection:
    """One libvirt connection, opened lazily in a worker thread and reopened after a loss."""

    def __init__(self, uri: str | None, *, timeout: float = 30.0, read_only: bool = False,
                 keepalive: tuple[int, int] = DEFAULT_KEEPALIVE, max_threads: int = 4,
                 credentials_file: str | None = None) -> None:
        self.requested_uri = uri
        # A file of user name and password for libvirt's auth callbacks (SASL), read at
        # every open (drivers/credentials.py); None: libvirt asks nobody.
        self.credentials_file = credentials_file
        self.timeout = timeout
        self.read_only = read_only
        # libvirt's keepalive (interval seconds, count): a remote daemon that stops
        # answering without closing TCP is taken as lost after about interval * count s.
        self.keepalive = keepalive
        # Calls running at once; an abandoned call leaves it, its thread stays counted in
        # `_threads` until it returns.
        self.limiter = trio.CapacityLimiter(max_threads)
        self._threads = trio.CapacityLimiter(max_threads + MAX_ABANDONED)
        self._conn: libvirt.virConnect | None = None
        self._lost: list[libvirt.virConnect] = []
        self._busy: dict[libvirt.virConnect, int] = {}  # calls using each connection
        self._open_lock = threading.Lock()
        self._on_open: list[tuple[OnOpen, OnClose | None]] = []
        self._on_late: list[Callable[[str], None]] = []
        self._on_lost: list[Callable[[str], None]] = []
        self._on_change: list[Callable[[], None]] = []
        self.faults = faults.from_environment()
        self.counting = counting.enabled()
        self._state_lock = threading.Lock()
        self._abandoned = 0  # threads of abandoned calls still running
        self._probing = False
        # Set while a liveness probe has gone unanswered for PROBE_SECONDS: calls fail
        # at once (`ls -l` of a dead host must not take one timeout per file).
        self._hung_since: float | None = None
        self._in_flight: set[trio.CancelScope] = set()
        self._running: set[_Call] = set()  # calls whose threads are in libvirt now
        # Long calls (jobs, drivers/jobs.py): no timeout, never abandoned, not counted as
        # stuck; they have their own thread allowance.
        self._long: set[_Call] = set()
        self._long_threads = trio.CapacityLimiter(MAX_LONG_CALLS)
        self._watcher: threading.Thread | None = None
        # Set by close_now: the watcher stops, and no probe opens a connection again.
        self._closing = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        # For `status`, read without a lock and without libvirt: a thread is in
        # libvirt's open now, and why the last connection went (or could not be made).
        self._opening = False
        self._down_reason = "not connected yet"

    @property
    def where(self) -> str:
        return self.requested_uri or "the default URI"

    @property
    def connected(self) -> bool:
        """Whether a connection is open (as far as libvirt's close callback has said)."""
        return self._conn is not None

    def status(self) -> str:
        """`connected`, `connecting` or `disconnected: REASON`, from this object's own
        state only: it never waits for libvirt, so a hung host answers it at once."""
        if self._closing.is_set():
            return "disconnected: closed"
        hung_since = self._hung_since
        if hung_since is not None:
            waited = time.monotonic() - hung_since + min(PROBE_SECONDS, self.timeout)
            return f"disconnected: not answering (a liveness probe has waited {waited:.0f} s)"
        if self._conn is not None:
            return "connected"
        if self._opening:
            return "connecting"
        return f"disconnected: {self._down_reason}"

    def on_open(self, callback: OnOpen, on_close: OnClose | None = None) -> None:
        """Run `callback(conn)` (in the worker thread) each time the connection is (re)opened;
        event registrations belong to one connection and must be made again after a loss.
        `on_close(conn)` runs before that connection is closed, to undo them."""
        self._on_open.append((callback, on_close))

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Run `callback(reason)` (in whichever thread notices) when the open connection is
        lost; reason is a word: eof, error, keepalive, client (libvirt's close reasons) or
        dead (found not alive)."""
        self._on_lost.append(callback)

    def on_late(self, callback: Callable[[str], None]) -> None:
        """Run `callback(description)` (in the worker thread) when an abandoned call returns:
        what it did has not been reported to anyone."""
        self._on_late.append(callback)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Run `callback()` when a call that may change something (`changes=True`, every
        long call, and a block holding the connection through `using`) has ended, however
        it ended: what was read before it may be out of date now (drivers/tables.py).
        It runs on the trio loop, or in the worker thread of a `using` block."""
        self._on_change.append(callback)

    def _changed(self) -> None:
        for callback in self._on_change:
            try:
                callback()
            except Exception:
                log.exception("reporting a change")

    # -- in worker threads -------------------------------------------------------------

    @contextlib.contextmanager
    def using(self) -> Iterator[libvirt.virConnect]:
        """The open connection, held for a block in a worker thread: a call that needs two
        hosts' connections (a migration) holds the second one this way.  What it does
        there is a change on this host too."""
        try:
            with self._using() as conn:
                yield conn
        finally:
            self._changed()

    @contextlib.contextmanager
    def _using(self) -> Iterator[libvirt.virConnect]:
        """The open connection, which is not closed while this block uses it: a call in
        another thread may find it lost meanwhile."""
        conn = self._open()
        try:
            yield conn
        finally:
            with self._state_lock:
                left = self._busy.pop(conn) - 1
                if left:
                    self._busy[conn] = left
            if self._closing.is_set():
                # close_now left it to this block (a job, a migration holding the
                # destination); no _open will come to close it: the last user does.
                self._close_lost()

    def _open(self) -> libvirt.virConnect:
        """The connection, opened if need be, counted as in use (see `_using`)."""
        with self._open_lock:
            conn = self._open_locked()
            with self._state_lock:
                self._busy[conn] = self._busy.get(conn, 0) + 1
            return conn

    def _open_locked(self) -> libvirt.virConnect:
        if self._closing.is_set():
            raise DriverError(errno.ENOTCONN, f"the connection to {self.where} is closed: "
                                              f"the host was disconnected (rmdir) or the "
                                              f"filesystem is unmounting")
        # Read once: libvirt's close callback may set it to None meanwhile, on its thread
        # (a None among the lost connections failed every later open with EIO).
        conn = self._conn
        if conn is not None:
            if _alive(conn):
                return conn
            log.warning("connection to %s was lost; reconnecting", self.where)
            self._lose(conn, word="dead")
        self._close_lost()
        events.ensure_event_loop()
        self._opening = True
        try:
            return self._connect()
        finally:
            self._opening = False

    def _connect(self) -> libvirt.virConnect:
        uri = self.requested_uri
        try:
            conn = self._libvirt_open(uri)
        except libvirt.libvirtError as e:
            error = from_libvirt(e)
            message = _with_hint(error.strerror or "libvirt could not connect")
            self._down_reason = message
            raise DriverError(_open_errno(e, error), message, error.libvirt_code) from None
        if self._closing.is_set():  # closed while libvirt was opening it (close() left it)
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            raise DriverError(errno.ENOTCONN, f"the connection to {self.where} was closed "
                                              f"while it was being opened")
        with contextlib.suppress(libvirt.libvirtError):
            conn.setKeepAlive(*self.keepalive)  # local drivers have none; nothing to do
        with contextlib.suppress(libvirt.libvirtError):
            conn.registerCloseCallback(self._closed, None)
        self._conn = conn
        for callback, _ in self._on_open:
            try:
                callback(conn)
            except libvirt.libvirtError as e:
                log.warning("%s: %s", self.where, e.get_error_message())
        return conn

    def _libvirt_open(self, uri: str | None) -> libvirt.virConnect:
        if self.credentials_file is None:
            return libvirt.openReadOnly(uri) if self.read_only else libvirt.open(uri)
        try:
            found = credentials.read_credentials(self.credentials_file)
        except credentials.CredentialsError as e:
            self._down_reason = e.strerror
            raise
        auth = [credentials.ANSWERED, credentials.auth_callback(found), None]
        flags = libvirt.VIR_CONNECT_RO if self.read_only else 0
        return libvirt.openAuth(uri, auth, flags)

    def _closed(self, conn: libvirt.virConnect, reason: int, opaque: object) -> None:
        """libvirt's close callback (on its event thread): only mark the loss; closing
        happens in a worker thread before the next connection is opened."""
        why = self._close_reason(reason)
        log.warning("connection to %s closed: %s", self.where, why)
        self._lose(conn, why, eventwords.close_reason(reason))

    def _close_reason(self, reason: int) -> str:
        interval, count = self.keepalive
        return {
            libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "the connection failed",
            libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "the daemon closed the connection",
            libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE:
                f"no answer to keepalive messages ({count} sent {interval} s apart)",
            libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed",
        }.get(reason, f"libvirt closed the connection (reason {reason})")

    def _lose(self, conn: libvirt.virConnect, reason: str = "the connection was lost",
              word: str = "") -> None:
        """`reason` for `status`, `word` for the events file (none: not worth a line)."""
        if conn is None:
            return
        with self._state_lock:
            current = self._conn is conn
            if current:
                self._conn = None
                self._down_reason = reason
            if conn not in self._lost:
                self._lost.append(conn)
        if current and word and not self._closing.is_set():
            for callback in self._on_lost:
                try:
                    callback(word)
                except Exception:
                    log.exception("reporting a lost connection")

    def _close_lost(self) -> None:
        """Close lost connections that no call uses any more (under `_open_lock`, or, once
        closing, by their last user).  Their event callbacks hold references to them:
        unless deregistered, the client library keeps the socket open and libvirtd keeps
        sending events on it."""
        with self._state_lock:
            idle = [conn for conn in self._lost if conn not in self._busy]
            self._lost = [conn for conn in self._lost if conn in self._busy]
        for conn in idle:
            self._close(conn)

    def _close(self, conn: libvirt.virConnect) -> None:
        for _, on_close in self._on_open:
            if on_close is not None:
                try:
                    on_close(conn)
                except libvirt.libvirtError as e:
                    log.debug("%s: %s", self.where, e.get_error_message())
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._using() as conn:
            target, fault = (self._inject(conn, fn) if self.faults is not None
                             else (conn, None))
            if self.counting:
                counting.count("hops")
                target = counting.Counted(target)
            try:
                result = fn(target, *args)
            except libvirt.libvirtError as e:
                # One failed message (too large, say) leaves the connection as it was.
                if e.get_error_code() in _CONNECTION_GONE and not _alive(conn):
                    log.warning("connection to %s was lost: %s", self.where,
                                e.get_error_message())
                    # Closed by the next _open, once nobody uses it.
                    self._lose(conn, e.get_error_message(), "dead")
                raise from_libvirt(e) from None
        faults.FaultRules.apply_stall(fault)
        return result

    def _inject(self, conn: libvirt.virConnect, fn: Callable[..., Any]
                ) -> tuple[Any, faults.Fault | None]:
        """Apply the fault rule for this host, if any; returns what the call talks to, and
        the rule (a stall applies after the call)."""
        call = getattr(fn, "__qualname__", "")
        fault = self.faults.fault_for(self.requested_uri, call) if self.faults else None
        if fault is None:
            return conn, None
        if fault.target is not None:
            return faults.SlowObjects(conn, fault), None
        if fault.kind == "drop":
            # What libvirtd going away looks like from here: the close callback runs and
            # this connection is dead; the call at hand fails, the next one reconnects.
            self._closed(conn, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)
            raise DriverError(errno.ENOTCONN, "injected fault: the connection was dropped")
        faults.FaultRules.apply_delay_or_error(fault)
        return conn, fault

    def _probe(self) -> None:
        """Ask the daemon something cheap; if it does not answer within PROBE_SECONDS the
        host is hung until it does (in a daemon thread of its own)."""
        answered = threading.Event()

        def ask() -> None:
            try:
                with self._using() as conn:
                    target, fault = (self._inject(conn, ask) if self.faults is not None
                                     else (conn, None))
                    target.getLibVersion()
                faults.FaultRules.apply_stall(fault)
            except (libvirt.libvirtError, OSError) as e:
                log.info("liveness probe of %s: %s", self.where, e)
            finally:
                answered.set()

        try:
            threading.Thread(target=ask, name="libvirtfs-probe", daemon=True).start()
            if answered.wait(min(PROBE_SECONDS, self.timeout)):
                return
            with self._state_lock:
                self._hung_since = time.monotonic()
            if self._token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(self._give_up_in_flight)
            log.warning("%s is not answering: a liveness probe got no answer within %g s; "
                        "calls fail at once until it answers", self.where,
                        min(PROBE_SECONDS, self.timeout))
            answered.wait()
            log.info("%s answered again", self.where)
        finally:
            with self._state_lock:
                self._hung_since = None
                self._probing = False

    def _watch(self) -> None:
        """(A daemon thread per connection.)  Probe while two calls have been running for
        KICK_SECONDS: the probe's message unsticks libvirt's client.  With keepalive on
        (libvirt 9), while one call waits for a stuck QEMU monitor, the replies to other
        threads' calls may wait until another message is sent on the connection."""
        while not self._closing.wait(KICK_SECONDS):
            now = time.monotonic()
            with self._state_lock:
                waiting = sorted(now - call.began for call in self._running)
                jobs = bool(self._long)
            # One call that waits long is its own business (the timeout's); a second one
            # waiting behind it may be one of those replies.  A running job is such a
            # long waiter: one ordinary call behind it is enough.
            behind = waiting[-1] if jobs and waiting else (
                waiting[-2] if len(waiting) >= 2 else 0.0)
            if behind > KICK_SECONDS:
                self._start_probe()

    def _start_probe(self) -> None:
        with self._state_lock:
            if self._probing or self._closing.is_set():
                return
            self._probing = True
        threading.Thread(target=self._probe, name="libvirtfs-liveness", daemon=True).start()

    def _report_late(self, what: str, error: BaseException | None, late_by: float) -> None:
        if error is None:
            log.warning("%s on %s succeeded after it had timed out (%.1f s late): the "
                        "caller got ETIMEDOUT, the change was made", what, self.where, late_by)
        else:
            log.warning("%s on %s failed after it had timed out (%.1f s late): %s",
                        what, self.where, late_by, error)
        for callback in self._on_late:
            try:
                callback(what)
            except Exception:
                log.exception("reporting a late outcome")

    def close_now(self) -> None:
        """Close the connection (blocking; for shutdown).  One that a call still uses
        (an abandoned call, a job, a migration holding its destination) is closed when
        that call is done with it."""
        self._closing.set()
        with self._open_lock:
            if self._conn is not None:
                self._lose(self._conn, "closed")
            self._close_lost()

    # -- on the trio loop --------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any, what: str | None = None,
                   changes: bool = True) -> T:
        """`fn(conn, *args)` in a worker thread; DriverError on failure or timeout.  `what`
        names the call in the log should it finish after its timeout.  `changes=False`
        says it only reads (a job's poll, a listing): finishing late, it changed nothing
        to read afresh, and what the host's tables hold stays true (`on_change`)."""
        self._refuse_if_hung()
        if self._abandoned >= MAX_ABANDONED:
            raise DriverError(errno.ETIMEDOUT, f"{self._abandoned} libvirt calls to "
                                               f"{self.where} still wait after "
                                               f"{self.timeout:g} s; no more are started")
        call = _Call(what or getattr(fn, "__qualname__", "a libvirt call"))
        self._start_watcher()

        def in_thread() -> T:
            with self._state_lock:
                if call.abandoned:
                    raise _NeverRan  # given up before it began: nobody waits for it
                call.started = True
                call.began = time.monotonic()
                self._running.add(call)
            error: BaseException | None = None
            try:
                return self._run(fn, args)
            except BaseException as e:
                error = e
                raise
            finally:
                with self._state_lock:
                    call.done = True
                    self._running.discard(call)
                    late = call.abandoned
                    if late:
                        self._abandoned -= 1
                if late and changes:
                    self._report_late(call.what, error, time.monotonic() - call.deadline)
                elif late:
                    log.debug("%s on %s returned %.1f s after it had timed out", call.what,
                              self.where, time.monotonic() - call.deadline)

        self._token = trio.lowlevel.current_trio_token()
        call.deadline = time.monotonic() + self.timeout
        scope = trio.CancelScope(deadline=trio.current_time() + self.timeout)
        self._in_flight.add(scope)
        try:
            with scope:
                async with self.limiter:
                    return await trio.to_thread.run_sync(
                        in_thread, limiter=self._threads, abandon_on_cancel=True)
        except BaseException:  # cancelled from outside (unmount): abandoned all the same
            self._abandon(call)
            raise
        finally:
            self._in_flight.discard(scope)
            if changes:
                self._changed()
        # Out of time, or the host was found hung while this call waited.
        if self._abandon(call) and self._hung_since is None:
            self._start_probe()
        if self._hung_since is not None:
            raise DriverError(errno.ETIMEDOUT, f"{self.where} is not answering: a liveness "
                                               f"probe got no answer either")
        raise DriverError(errno.ETIMEDOUT, f"libvirt did not answer within {self.timeout:g} s "
                                           f"({self.where})")

    async def call_long(self, fn: Callable[..., T], *args: Any, what: str | None = None) -> T:
        """`fn(conn, *args)` in a worker thread with no timeout: a job (drivers/jobs.py),
        which runs as long as it progresses, watched by its own short calls.  It is not a
        stuck call for the hung-host rule and is never abandoned while anyone waits; only
        a cancel from outside (unmount) leaves its thread to finish alone."""
        self._refuse_if_hung()
        call = _Call(what or getattr(fn, "__qualname__", "a libvirt job"))
        self._start_watcher()

        def in_thread() -> T:
            with self._state_lock:
                call.started = True
                call.began = time.monotonic()
                self._long.add(call)
            try:
                return self._run(fn, args)
            finally:
                with self._state_lock:
                    call.done = True
                    self._long.discard(call)

        self._token = trio.lowlevel.current_trio_token()
        try:
            return await trio.to_thread.run_sync(in_thread, limiter=self._long_threads,
                                                 abandon_on_cancel=True)
        finally:
            self._changed()

    def _refuse_if_hung(self) -> None:
        """While a liveness probe goes unanswered, calls fail at once."""
        hung_since = self._hung_since
        if hung_since is not None:
            raise DriverError(errno.ETIMEDOUT, f"{self.where} is not answering: a liveness "
                                               f"probe has waited "
                                               f"{time.monotonic() - hung_since:.0f} s")

    def _start_watcher(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="libvirtfs-watch",
                                             daemon=True)
            self._watcher.start()

    def _abandon(self, call: _Call) -> bool:
        """Nobody waits for `call` any more; True if its thread is still in libvirt."""
        with self._state_lock:
            if call.abandoned:
                return False
            call.abandoned = True
            running = call.started and not call.done
            if running:
                self._abandoned += 1
            return running

    def _give_up_in_flight(self) -> None:
        """(On the trio loop.)  The host is hung: calls waiting on it give up now rather
        than each at its own timeout."""
        for scope in list(self._in_flight):
            scope.cancel()

    async def close(self) -> None:
        """Close at unmount; a hung host must not keep the process from exiting."""
        self._closing.set()
        if self._opening:
            # A thread is in libvirt's open, holding the lock close_now needs, maybe for
            # ever (a host that accepts and never answers): it closes what it gets itself.
            return
        with trio.move_on_after(min(self.timeout, 5.0)):
            await trio.to_thread.run_sync(self.close_now, abandon_on_cancel=True)


def _open_errno(e: libvirt.libvirtError, error: DriverError) -> int:
    """The errno for a failed open.  A URI libvirt cannot use (no driver for its scheme,
    not a URI, a bad argument) is EINVAL, denied credentials EACCES; otherwise, however
    libvirt words it (a missing socket reads as ENOENT), the host cannot be reached
    (ENOTCONN): the objects under it are not known to be gone."""
    message = e.get_error_message() or ""
    if error.errno in (errno.EINVAL, errno.EACCES):
        return error.errno
    if "no connection driver available" in message or "Unable to parse URI" in message:
        return errno.EINVAL
    return errno.ENOTCONN


# libvirt's words for a refusal whose reason only the far end knows, and what it means.
_HINTS = {
    "Unable to read TLS confirmation":
        "the daemon refused the TLS handshake; its log says why: most often this client's "
        "pkipath holds no clientcert.pem, or one signed by a CA the daemon does not trust",
    "No worthy mechs found":
        "the daemon asks for a user name and password: name a credentials file in the "
        "host's [[host]] table (docs/hosts.md)",
}


def _with_hint(message: str) -> str:
    for words, hint in _HINTS.items():
        if words in message:
            return f"{message} ({hint})"
    return message


def _alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


class _NeverRan(Exception):
    pass


class _Call:
    """One call's progress: started in a thread, finished, or given up on."""

    __slots__ = ("abandoned", "began", "deadline", "done", "started", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.started = False
        self.done = False
        self.abandoned = False
        self.deadline = 0.0
        self.began = 0.0
