"""A loopback TCP proxy for fault tests: forwards a free 127.0.0.1 port to a broker; can cut, blackhole or slow it."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
import types
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

_T = TypeVar("_T")

#: Port of each broker URL scheme when the URL names none.
DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671}


def is_loopback(host: str) -> bool:
    """Whether ``host`` resolves to a loopback address (127.0.0.0/8 or ::1)."""
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback
            for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        )
    except (OSError, ValueError):
        return False


def target_of(url: str) -> tuple[str, int]:
    """Host and port a broker URL points to (the scheme's default port if it names none)."""
    parts = urlsplit(url)
    return parts.hostname or "localhost", parts.port or DEFAULT_PORTS[parts.scheme.lower()]


class _Link:
    """One proxied connection: the client's socket and ours to the target."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.writers = (client, upstream)

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()


class TcpProxy:
    """Listens on a free 127.0.0.1 port and forwards every connection to ``target_host:target_port``.

    It runs its own event loop in a daemon thread, so it keeps forwarding whatever the test's loop does, and
    every method may be called from any thread. ``cut()`` aborts every open connection (both sides see a
    reset) and keeps listening, so clients can reconnect; ``blackhole()`` keeps connections open but drops
    every byte in both directions (a broker that stopped answering); ``slow()`` delays every byte (a distant
    broker). The target must be a loopback address.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        if not is_loopback(target_host):
            raise ValueError(f"the proxy only forwards to loopback addresses, not {target_host!r}")
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        #: Connections accepted so far.
        self.accepted = 0
        #: Bytes forwarded from clients to the target so far (what the clients sent).
        self.sent = 0
        self._blackholed = False
        self._delay = 0.0
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)

    def start(self) -> TcpProxy:
        """Start listening; ``port`` is then the port to connect to."""
        self._thread.start()
        self._call(self._start())
        return self

    @property
    def connections(self) -> int:
        """Connections open through the proxy right now."""
        return len(self._links)

    def cut(self) -> int:
        """Abort every open connection (the listener stays); returns how many were cut."""
        return self._call(self._cut())

    def blackhole(self, enabled: bool = True) -> None:
        """Drop (``True``) or forward again (``False``) all traffic, on open and new connections alike.

        Bytes dropped mid-stream leave open connections unusable: ``cut()`` them after turning this off.
        """
        self._blackholed = enabled

    def slow(self, delay: float = 0.0) -> None:
        """Deliver every byte ``delay`` seconds late, in each direction (0 turns it off).

        This is latency, not a bandwidth limit: bytes keep their order and stream at full speed, each
        arriving ``delay`` after it was sent, so a round trip takes ``2 * delay`` more.
        """
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        self._delay = delay

    def via(self, url: str) -> str:
        """``url`` with its host and port replaced by this proxy's; credentials, path and query are kept."""
        parts = urlsplit(url)
        credentials, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{credentials}{at}127.0.0.1:{self.port}"))

    def stop(self) -> None:
        """Close the listener and every connection, then stop the thread."""
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _cut(self) -> int:
        links = list(self._links)
        self._links.clear()  # at once: ``connections`` counts only connections made after the cut
        for link in links:
            link.abort()
        await asyncio.sleep(0)
        return len(links)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()
        # Handlers end by themselves once their sockets are gone (asyncio logs an error for a cancelled one).
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        handler = asyncio.current_task()
        if handler is not None:
            self._tasks.add(handler)
            handler.add_done_callback(self._tasks.discard)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        link = _Link(client_writer, upstream_writer)
        self._links.add(link)
        pumps = [
            asyncio.ensure_future(self._pump(client_reader, upstream_writer, upstream=True)),
            asyncio.ensure_future(self._pump(upstream_reader, client_writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            link.abort()
            self._links.discard(link)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool = False) -> None:
        # Reading and writing are apart so that a delay holds back each chunk without slowing the stream.
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def forward() -> None:
            while (chunk := await chunks.get()) is not None:
                due, data = chunk
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(forward())
        try:
            with contextlib.suppress(ConnectionError, OSError):
                while not sender.done() and (data := await reader.read(65536)):
                    if upstream:
                        self.sent += len(data)
                    if not self._blackholed:
                        chunks.put_nowait((loop.time() + self._delay, data))
                chunks.put_nowait(None)  # end of stream: what is queued still goes out
                await sender
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
