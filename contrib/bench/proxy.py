"""A TCP proxy on loopback that delays every chunk by a fixed time, each direction.

This kernel has no sch_netem (`tc qdisc ... netem` fails: "Specified qdisc kind is
unknown"), so latency is emulated here instead: every chunk read from one side is written
to the other side `delay` seconds after it arrived, in order.  The far end is libvirtd's
own UNIX socket (the shared test-bed daemon does not listen on TCP and must not be
restarted), so `qemu+tcp://127.0.0.1:PORT/system` reaches the same daemon as
qemu:///system, over TCP with a round trip of 2 x delay.

It also counts the RPC messages each way (libvirt's framing: every message starts with
its length, 4 bytes big-endian, counting themselves): a client's calls and the daemon's
replies and events.  Each call is a round trip the caller waits for.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import deque


class DelayProxy:
    def __init__(self, target: str, delay: float) -> None:
        self.target = target  # a UNIX socket path
        self.delay = delay
        self.port = 0
        self.requests = 0  # RPC messages client -> daemon
        self.replies = 0   # RPC messages daemon -> client (replies and events)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="delay-proxy")

    def start(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def uri(self, driver: str = "qemu") -> str:
        return f"{driver}+tcp://127.0.0.1:{self.port}/system"

    def counts(self) -> tuple[int, int]:
        return self.requests, self.replies

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        try:
            daemon_r, daemon_w = await asyncio.open_unix_connection(self.target)
        except OSError:
            client_w.close()
            return
        for w in (client_w, daemon_w):
            sock = w.get_extra_info("socket")
            if sock is not None and sock.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(self._pipe(client_r, daemon_w, upstream=True),
                             self._pipe(daemon_r, client_w, upstream=False),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    *, upstream: bool) -> None:
        """Read chunks as they come; a second task writes each one `delay` after it came."""
        queue: deque[tuple[float, bytes]] = deque()
        arrived = asyncio.Event()
        done = False

        async def deliver() -> None:
            while True:
                while not queue:
                    if done:
                        return
                    arrived.clear()
                    await arrived.wait()
                due, data = queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        framing = Framing()
        try:
            while data := await reader.read(65536):
                if upstream:
                    self.requests += framing.messages(data)
                else:
                    self.replies += framing.messages(data)
                queue.append((time.monotonic() + self.delay, data))
                arrived.set()
        finally:
            done = True
            arrived.set()
            try:
                await sender
            finally:
                writer.close()


class Framing:
    """Counts the messages of one direction of libvirt's RPC stream, across chunks."""

    def __init__(self) -> None:
        self.skip = 0        # bytes left of the current message's body
        self.header = b""    # the start of a length not yet complete

    def messages(self, data: bytes) -> int:
        found, at = 0, 0
        while at < len(data):
            if self.skip:
                step = min(self.skip, len(data) - at)
                self.skip -= step
                at += step
                continue
            need = 4 - len(self.header)
            self.header += data[at:at + need]
            at += need
            if len(self.header) == 4:
                length = int.from_bytes(self.header, "big")
                self.header = b""
                self.skip = max(0, length - 4)
                found += 1
        return found
