"""A loopback TCP proxy for fault tests: forwards a free 127.0.0.1 port to a broker, and can cut or blackhole it."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
import types
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


def is_loopback(host: str) -> bool:
    """Whether ``host`` resolves to a loopback address (127.0.0.0/8 or ::1)."""
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback
            for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        )
    except (OSError, ValueError):
        return False


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
    every byte in both directions (a broker that stopped answering). The target must be a loopback address.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        if not is_loopback(target_host):
            raise ValueError(f"the proxy only forwards to loopback addresses, not {target_host!r}")
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        #: Connections accepted so far.
        self.accepted = 0
        self._blackholed = False
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

    def cut(self) -> int:
        """Abort every open connection (the listener stays); returns how many were cut."""
        return self._call(self._cut())

    def blackhole(self, enabled: bool = True) -> None:
        """Drop (``True``) or forward again (``False``) all traffic, on open and new connections alike.

        Bytes dropped mid-stream leave open connections unusable: ``cut()`` them after turning this off.
        """
        self._blackholed = enabled

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
            asyncio.ensure_future(self._pump(client_reader, upstream_writer)),
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

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if not self._blackholed:
                    writer.write(data)
                    await writer.drain()
