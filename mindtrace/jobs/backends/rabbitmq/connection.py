"""The RabbitMQ connections of a RabbitMQClient (consuming, publishing), their channels, and the error boundary."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl as _ssl
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.channel import Channel
from aio_pika.connection import make_url
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import AMQPConnectionError, AMQPError, ChannelInvalidStateError

from mindtrace.jobs.backends._endpoint import Endpoint, ErrorMap, failed, map_errors, unavailable
from mindtrace.jobs.backends.rabbitmq import conditions
from mindtrace.jobs.backends.rabbitmq.topology import EXCHANGE
from mindtrace.jobs.errors import BackendUnavailableError, ClosedError

_T = TypeVar("_T")

# Idle operation channels kept open for reuse.
_IDLE_CHANNELS: Final = 4

# Driver errors that mean the broker could not be reached or the connection went away under an operation.
_CONNECTION_ERRORS: Final = (AMQPConnectionError, OSError, ChannelInvalidStateError)


def _lost_connection(error: BaseException, endpoint: Endpoint) -> BackendUnavailableError | None:
    """The predicate row of the boundary: one of the untyped ways the driver reports a connection closing
    under an operation becomes BackendUnavailableError; anything else is declined (None).

    aiormq raises ``RuntimeError("<Connection ...> closed")`` when the connection closed between aio-pika's
    "ready" and a channel open, and rejects operations pending on a closing connection with a bare
    ``Exception``. Only errors raised inside the driver count, so a bug of ours is never relabelled.
    """
    if type(error) not in (Exception, RuntimeError):
        return None
    frames = list(traceback.walk_tb(error.__traceback__))
    module = str(frames[-1][0].f_globals.get("__name__", "")) if frames else ""
    if module.split(".")[0] not in {"aiormq", "aio_pika"}:
        return None
    return endpoint.unavailable(
        f"lost the connection to {endpoint.describe()} during the operation: {type(error).__name__}: {error}"
    )


def _no_answer(error: BaseException, endpoint: Endpoint, *, seconds: float) -> BackendUnavailableError:
    """An operation that timed out: the broker did not answer within ``seconds`` (``operation_timeout``)."""
    return endpoint.unavailable(f"no answer from {endpoint.describe()} within {seconds:g}s")


class _Secret:
    """A password that never shows in a repr, a log line or a traceback's locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The password itself, for the driver only."""
        return self._value

    def __repr__(self) -> str:
        return "'********'"


def _on_open_channel(message: AbstractIncomingMessage) -> bool:
    """Whether the channel ``message`` came on is open: once it closed, the broker took the message back."""
    try:
        return not message.channel.is_closed
    except ChannelInvalidStateError:
        return False


class _Channels:
    """The two robust connections of one RabbitMQClient, their channels, and the boundary where driver errors
    become ours.

    Publishes (retries, dead-letters and give-backs included) go out on a connection of their own
    (``publish_connection``): during a resource alarm the broker stops reading from a connection that
    publishes, acks on it included, so acks go on the other one (``connection``). ``publish_blocked`` follows
    the broker blocking the publishing connection. Operations (declare, count, purge, delete) take a pooled
    channel each (``ops_channel``); publishes go on one channel with publisher confirms (``confirm_channel``);
    each receiver lane opens a channel of its own (``open_channel``). ``backend`` is the client's
    ``describe()``, for messages; ``is_closed`` tells whether the client was closed; ``name`` is the connections'
    name the broker shows (the publishing one adds " publisher").
    """

    def __init__(
        self,
        *,
        endpoint: Endpoint,
        password: _Secret,
        ssl_context: _ssl.SSLContext | None,
        heartbeat: int,
        connect_timeout: float,
        operation_timeout: float,
        reconnect_interval: float,
        is_closed: Callable[[], bool],
        name: str = "mindtrace.jobs",
    ) -> None:
        self.endpoint = endpoint
        self.name = name
        self._password = password
        self._ssl_context = ssl_context
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.operation_timeout = operation_timeout
        self.reconnect_interval = reconnect_interval
        self.backend = endpoint.describe()
        self._is_closed = is_closed
        # Operations: a timeout, connection trouble, then the broker's refusals and other AMQP errors, then the
        # driver's untyped reports of a closing connection (a predicate; bugs of ours pass through).
        self._operation_errors = map_errors(
            (
                (asyncio.TimeoutError, functools.partial(_no_answer, seconds=operation_timeout)),
                (_CONNECTION_ERRORS, unavailable),
                (AMQPError, conditions.refusal),
                (AMQPError, failed),
                (Exception, _lost_connection),
            ),
            endpoint,
        )
        # Connecting: the broker answered and refused (login, vhost, permissions), else it was not reached.
        self._connect_errors = map_errors(
            (
                (Exception, conditions.refusal),
                (
                    (*CONNECTION_EXCEPTIONS, asyncio.TimeoutError),
                    functools.partial(conditions.unreachable, timeout=connect_timeout),
                ),
            ),
            endpoint,
        )
        #: The robust connection receivers, acks and operations use, between ``connect()`` and ``close()``.
        self.connection: aio_pika.RobustConnection | None = None
        #: The robust connection publishes go out on (see the class docstring), between ``connect()`` and ``close()``.
        self.publish_connection: aio_pika.RobustConnection | None = None
        #: Whether the broker blocks the publishing connection (a resource alarm), and why.
        self.publish_blocked = conditions.BlockedState()
        self._idle_channels: list[AbstractChannel] = []
        #: The channel publishes go on (see ``confirm_channel``), once opened.
        self.publish_channel: AbstractChannel | None = None
        self._publish_lock = asyncio.Lock()

    def boundary(self) -> ErrorMap:
        """The one place driver errors of operations become ours (the table built in ``__init__``)."""
        return self._operation_errors

    async def timed(self, operation: Awaitable[_T]) -> _T:
        """``operation`` bounded by ``operation_timeout`` (TimeoutError), without a task per call on 3.11+."""
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(self.operation_timeout):
                return await operation
        return await asyncio.wait_for(operation, self.operation_timeout)

    async def _open_connection(self, name: str) -> aio_pika.RobustConnection:
        """One robust connection, connected within ``connect_timeout``; a refusal or an unreachable broker is named."""
        url = make_url(
            host=self.endpoint.host,
            port=self.endpoint.port,
            login=self.endpoint.username or "",
            password=self._password.reveal(),
            virtualhost=self.endpoint.path,
            ssl=self.endpoint.tls,
            heartbeat=self.heartbeat,
            reconnect_interval=self.reconnect_interval,
        )
        # reconnect_interval again as a keyword: aio-pika 9 ignores the URL's options when given any keyword.
        connection = aio_pika.RobustConnection(
            url,
            ssl_context=self._ssl_context,
            client_properties={"connection_name": name},
            reconnect_interval=self.reconnect_interval,
        )
        try:
            with self._connect_errors:
                await connection.connect(timeout=self.connect_timeout)
        except BaseException:
            await self._close_connection(connection)
            raise
        return connection

    async def connect(self) -> None:
        """Open both connections in parallel and declare the exchange.

        BackendRefusedError if the broker refuses the login, the vhost or access to it; BackendUnavailableError if
        it is not reached within ``connect_timeout``.
        """
        opened = await asyncio.gather(
            self._open_connection(self.name),
            self._open_connection(f"{self.name} publisher"),
            return_exceptions=True,
        )
        failed = [result for result in opened if isinstance(result, BaseException)]
        connections = [result for result in opened if isinstance(result, aio_pika.RobustConnection)]
        if failed:
            for connection in connections:
                await self._close_connection(connection)
            raise failed[0]
        self.connection, self.publish_connection = connections
        self.publish_blocked.watch(self.publish_connection)
        try:
            with self.boundary():
                async with self.ops_channel() as channel:
                    await channel.declare_exchange(
                        EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True, timeout=self.operation_timeout
                    )
        except BaseException:
            self.connection = self.publish_connection = None
            for connection in connections:
                await self._close_connection(connection)
            raise

    async def _close_connection(self, connection: aio_pika.RobustConnection) -> None:
        with contextlib.suppress(Exception):
            await self.timed(connection.close())

    async def close(self) -> None:
        """Close both connections, forgetting their channels (closing a connection closes them)."""
        connections = (self.connection, self.publish_connection)
        self.connection = self.publish_connection = None
        self._idle_channels.clear()
        self.publish_channel = None
        for connection in connections:
            if connection is not None:
                await self._close_connection(connection)

    async def ready_connection(self, *, publish: bool = False) -> aio_pika.RobustConnection:
        """The connection (with ``publish``, the publishing one), once (re)connected within ``operation_timeout``.

        ClosedError after ``close()``, which forgets the connections only after the client gave held messages
        back (so those give-backs, made while the client is closing, still find the connection).
        """
        connection = self.publish_connection if publish else self.connection
        if connection is None:
            raise ClosedError(f"{self.backend} is closed")
        if not connection.connected.is_set():
            try:
                await self.timed(connection.ready())
            except asyncio.TimeoutError:
                raise self.endpoint.unavailable(
                    f"lost the connection to {self.backend} and could not reconnect within {self.operation_timeout:g}s"
                ) from None
        return connection

    async def open_channel(self, *, confirms: bool = False, prefetch: int | None = None) -> AbstractChannel:
        """A new channel; with ``confirms``, publishes wait for the broker's ack and unroutable ones raise."""
        connection = await self.ready_connection(publish=confirms)  # confirmed channels publish: their own connection
        channel = Channel(connection, publisher_confirms=confirms, on_return_raises=confirms)
        try:
            await self.timed(channel.initialize())
            if prefetch is not None:
                await channel.set_qos(prefetch_count=prefetch, timeout=self.operation_timeout)
        except BaseException:
            await self.discard(channel)
            raise
        return channel

    async def discard(self, channel: AbstractChannel) -> None:
        """Close ``channel`` if open, ignoring errors (best effort, bounded by ``operation_timeout``)."""
        if not channel.is_closed:
            with contextlib.suppress(Exception):
                await self.timed(channel.close())

    @contextlib.asynccontextmanager
    async def ops_channel(self) -> AsyncIterator[AbstractChannel]:
        """A channel for one operation at a time: an error that closes it (404, 406) harms nothing else."""
        channel = None
        while self._idle_channels and channel is None:
            candidate = self._idle_channels.pop()
            if not candidate.is_closed:
                channel = candidate
        if channel is None:
            channel = await self.open_channel()
        reusable = False
        try:
            yield channel
            reusable = True
        finally:
            pooled = len(self._idle_channels) < _IDLE_CHANNELS
            if reusable and pooled and not channel.is_closed and not self._is_closed():
                self._idle_channels.append(channel)
            else:
                await self.discard(channel)

    async def confirm_channel(self) -> AbstractChannel:
        """The channel publishes go on (publisher confirms), opened again if it closed."""
        channel = self.publish_channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._publish_lock:
            channel = self.publish_channel
            if channel is None or channel.is_closed:
                channel = self.publish_channel = await self.open_channel(confirms=True)
            return channel
