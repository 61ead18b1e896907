"""RabbitMQClient: jobs over AMQP 0-9-1 with a robust connection, publisher confirms and priority queues."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import importlib.metadata
import logging
import math
import ssl as _ssl
import sys
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.channel import Channel
from aio_pika.connection import make_url
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq import spec
from aiormq.exceptions import (
    AMQPConnectionError,
    AMQPError,
    AuthenticationError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    ProbableAuthenticationError,
)

from mindtrace.jobs.backends.base import Backend, Delivery, OutgoingMessage, QueueOptions, Receiver
from mindtrace.jobs.constants import (
    AMQP_EXCHANGE,
    AMQP_HEARTBEAT,
    AMQP_RECONNECT_INTERVAL,
    MAX_PAYLOAD_BYTES,
    MAX_PRIORITY,
    OPERATION_TIMEOUT,
)
from mindtrace.jobs.errors import (
    BackendError,
    BackendUnavailableError,
    ClosedError,
    ConfigurationError,
    JobsError,
    LeaseLostError,
    PublishError,
    QueueConflictError,
    QueueNotFoundError,
    translate_driver_errors,
)

logger = logging.getLogger("mindtrace.jobs")

_T = TypeVar("_T")

#: The durable direct exchange every job is published to; each queue is bound to it under its own name.
EXCHANGE: Final = AMQP_EXCHANGE

#: Upper bounds (ms) of the retry-delay queues of a queue: half-octave steps from 1 ms to 2**31 ms (24.8 days).
#: A retry waiting ``d`` ms goes to the first bucket >= d with a per-message expiration of exactly ``d``.
RETRY_BUCKETS_MS: Final = tuple(sorted({math.ceil(2 ** (k / 2)) for k in range(63)}))

# An idle retry queue is deleted by the broker this long after its last message could have left it.
_RETRY_QUEUE_GRACE_MS: Final = 60_000

# Idle operation channels kept open for reuse.
_IDLE_CHANNELS: Final = 4

# publish_many sends this many messages before it waits for their confirms.
_PUBLISH_WINDOW: Final = 256

# AMQP reply code of a mandatory message that no queue was bound to receive.
_NO_ROUTE: Final = 312

# Driver errors that mean the broker could not be reached or the connection went away under an operation.
_CONNECTION_ERRORS: Final = (AMQPConnectionError, OSError, asyncio.TimeoutError, ChannelInvalidStateError)

# aiormq 6 (aio-pika 9, all that Python 3.10 installs) lacks consumer-cancel callbacks and mishandles nowait.
_AIORMQ_6: Final = int(importlib.metadata.version("aiormq").split(".")[0]) < 7

#: Query options ``from_url`` takes: ``heartbeat`` (an int) anywhere, ``ssl_ca_certs`` (a path) with amqps:// only.
_URL_OPTIONS: Final = ("heartbeat", "ssl_ca_certs")


def _lost_connection(error: BaseException) -> bool:
    """Whether ``error`` is one of the untyped ways the driver reports a connection closing under an operation.

    aiormq raises ``RuntimeError("<Connection ...> closed")`` when the connection closed between aio-pika's
    "ready" and a channel open, and rejects operations pending on a closing connection with a bare
    ``Exception``. Only errors raised inside the driver count, so a bug of ours is never relabelled.
    """
    if type(error) not in (Exception, RuntimeError):
        return False
    frames = list(traceback.walk_tb(error.__traceback__))
    module = str(frames[-1][0].f_globals.get("__name__", "")) if frames else ""
    return module.split(".")[0] in {"aiormq", "aio_pika"}


def retry_queue_name(queue: str, bucket_ms: int) -> str:
    """The retry-delay queue of ``queue`` for delays up to ``bucket_ms``.

    The ``:`` cannot occur in a queue name (see ``validate_queue_name``), so no user queue can collide with it.
    """
    return f"{queue}:retry:{bucket_ms}"


def retry_bucket(delay: float) -> tuple[int, int]:
    """``(bucket_ms, delay_ms)`` for a retry delay in seconds; delays over the last bucket are capped to it."""
    delay_ms = max(1, math.ceil(delay * 1000 - 1e-6))
    if delay_ms > RETRY_BUCKETS_MS[-1]:
        logger.warning("retry delay of %.0fs capped to %.0fs", delay, RETRY_BUCKETS_MS[-1] / 1000)
        delay_ms = RETRY_BUCKETS_MS[-1]
    return RETRY_BUCKETS_MS[bisect.bisect_left(RETRY_BUCKETS_MS, delay_ms)], delay_ms


class _Secret:
    """A password that never shows in a repr, a log line or a traceback's locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'********'"


@dataclass(eq=False)
class _Claim(Delivery):
    """A Delivery whose ``handle`` is the aio-pika message, remembering the receiver that holds it."""

    receiver: _RabbitMQReceiver | None = field(default=None, repr=False)


def _on_open_channel(message: AbstractIncomingMessage) -> bool:
    """Whether the channel ``message`` came on is open: once it closed, the broker took the message back."""
    try:
        return not message.channel.is_closed
    except ChannelInvalidStateError:
        return False


#: Broker priorities: job priority p is published as 2p, or 2p + 1 when the message resumes a cut-short run
#: (a job given back, a lost run recorded), so it goes ahead of the jobs waiting at its priority and behind
#: every job of a higher one, as on Redis. Queues are declared with this ``x-max-priority``.
BROKER_MAX_PRIORITY: Final = 2 * MAX_PRIORITY + 1


def broker_priority(priority: int, *, resumes: bool = False) -> int:
    """The AMQP priority a job of ``priority`` is published with (see BROKER_MAX_PRIORITY)."""
    return 2 * priority + (1 if resumes else 0)


def job_priority(broker: int | None) -> int:
    """The job priority of a message the broker delivered with AMQP priority ``broker`` (foreign: clamped)."""
    return min(MAX_PRIORITY, max(0, (broker or 0) // 2))


def _delivery_count(message: AbstractIncomingMessage) -> int:
    # Quorum queues count earlier deliveries in x-delivery-count; classic queues only flag a redelivery.
    count = (message.headers or {}).get("x-delivery-count")
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count + 1
    return 2 if message.redelivered else 1


_CancelCallback = Callable[[spec.Basic.Cancel], None]


class _CancelNotifyingConsumers(dict[str, Any]):
    """aiormq 6's ``Channel.consumers`` table, calling each of ``callbacks`` when a consumer is dropped from it."""

    def __init__(self, consumers: dict[str, Any]) -> None:
        super().__init__(consumers)
        self.callbacks: set[_CancelCallback] = set()

    def pop(self, tag: str, *default: Any) -> Any:
        had = tag in self
        value = super().pop(tag, *default)
        if had:
            frame = spec.Basic.Cancel(consumer_tag=tag)
            for callback in list(self.callbacks):
                callback(frame)
        return value


def _on_consumer_cancel(underlay: Any, callback: _CancelCallback) -> None:
    """Call ``callback(frame)`` when the broker cancels a consumer of the aiormq channel ``underlay``.

    aiormq 7 (aio-pika 10, Python >= 3.11) has ``on_consumer_cancel_callbacks`` for that. aiormq 6 (aio-pika 9,
    all that Python 3.10 installs) has no hook: on the broker's basic.cancel it only drops the tag from
    ``channel.consumers``, so that table is wrapped to report the drop. It also reports the cancel-ok of a
    client basic.cancel; ``callback`` ignores tags that are not the current consumer's.
    """
    callbacks = getattr(underlay, "on_consumer_cancel_callbacks", None)
    if callbacks is None:
        consumers = underlay.consumers
        if not isinstance(consumers, _CancelNotifyingConsumers):
            consumers = underlay.consumers = _CancelNotifyingConsumers(consumers)
        callbacks = consumers.callbacks
    callbacks.add(callback)


async def _queue_delete_nowait(underlay: Any, queue: str, timeout: float | None) -> None:
    """Send a queue.delete of ``queue`` on the aiormq channel ``underlay`` without waiting for its answer.

    aiormq 6 waits for an answer to a ``nowait`` call, which the broker never sends, so there the delete
    waits for its answer (bounded by ``timeout``) instead.
    """
    if _AIORMQ_6:
        await underlay.queue_delete(queue, timeout=timeout)
    else:
        await underlay.queue_delete(queue, nowait=True)


class _RabbitMQReceiver(Receiver):
    """Claims from one queue on a channel of its own, with QoS ``prefetch``.

    A receiver with ``prefetch`` 1 answers ``get`` with basic.get (a true "take one now", in queue order)
    until a ``get`` finds the queue empty and waits: that starts push delivery (basic.consume). With a larger
    ``prefetch`` (a consumer running jobs concurrently) push delivery starts at the first ``get``. In push
    mode, ``get`` takes what the broker pushed, so ``get(0)`` returns None until the first messages arrive.
    When the channel or the consumer is lost (connection drop, queue deleted), the next ``get`` subscribes
    again; messages pushed on the lost channel are dropped, since the broker gives them to someone else.
    Messages pushed but never handed out are given back at ``close()`` by re-publishing (see ``_return``).
    """

    def __init__(self, client: RabbitMQClient, queue: str, prefetch: int, channel: AbstractChannel) -> None:
        self._client = client
        self._queue = queue
        self._prefetch = prefetch
        self._channel = channel
        self._channel_lock = asyncio.Lock()
        self._consumer_tag: str | None = None
        self._push = False
        self._buffer: deque[AbstractIncomingMessage] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._subscribing: asyncio.Task[None] | None = None
        self._held: set[Delivery] = set()
        self._returning = 0  # late arrivals being given back after close()
        self._closed = False

    async def _watch(self, channel: AbstractChannel) -> None:
        channel.close_callbacks.add(self._on_channel_closed)
        underlay = await channel.get_underlay_channel()
        _on_consumer_cancel(underlay, self._on_consumer_cancelled)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake(self) -> None:
        """Wake every waiting get(): the receiver's state changed (subscribed, lost its channel, closed)."""
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _on_channel_closed(self, channel: Any, exc: BaseException | None = None) -> None:
        if channel is not self._channel:
            return
        # Everything pushed or held on this channel went back to the queue with it.
        self._consumer_tag = None
        self._buffer.clear()
        self._held.clear()
        self._wake()

    def _on_consumer_cancelled(self, frame: spec.Basic.Cancel) -> None:
        if frame.consumer_tag is not None and frame.consumer_tag == self._consumer_tag:
            self._consumer_tag = None
            self._wake()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._closed:
            # Arrived after close() began: give it back, holding the channel open until that is done.
            self._returning += 1
            try:
                with contextlib.suppress(Exception):
                    await self._client._return(message, self._queue)
            finally:
                self._returning -= 1
                await self._discard_if_idle()
        elif _on_open_channel(message):  # else it arrived as its channel died: the broker has it back
            self._buffer.append(message)
            self._wake_one()

    def _check_open(self) -> None:
        self._client._check_usable()
        if self._closed:
            raise ClosedError(f"receiver on queue {self._queue!r} is closed")

    async def get(self, timeout: float | None = None) -> Delivery | None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + max(0.0, timeout)
        while True:
            self._check_open()
            while self._buffer:
                message = self._buffer.popleft()
                if _on_open_channel(message):
                    return self._hand_out(message)
            if not self._push:
                if self._prefetch == 1:
                    # Take what is ready with basic.get first: push delivery would prefetch the next message,
                    # which a receiver that takes one job (receive_message) would have to give back.
                    pulled = await self._pull()
                    if pulled is not None or (timeout is not None and timeout <= 0):
                        return pulled
                self._push = True
            if self._consumer_tag is None and self._subscribing is None:
                self._subscribing = asyncio.ensure_future(self._subscribe())
                self._subscribing.add_done_callback(self._subscribed)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            subscribing = self._subscribing
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                if remaining is None and subscribing is None:
                    # The common wait (subscribed, no deadline): the waiter alone, with no asyncio.wait around it.
                    await waiter
                else:
                    waits: set[asyncio.Future[Any]] = {waiter} if subscribing is None else {waiter, subscribing}
                    await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                if waiter.done() and not waiter.cancelled() and self._buffer:
                    # Woken for a message this call will not take (it is cancelled): pass the wake-up on.
                    self._wake_one()
                raise
            finally:
                if not waiter.done() or waiter.cancelled():
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
            if subscribing is not None and subscribing.done() and not subscribing.cancelled():
                error = subscribing.exception()
                if error is not None:
                    raise error

    def _subscribed(self, task: asyncio.Task[None]) -> None:
        if self._subscribing is task:
            self._subscribing = None
        if not task.cancelled():
            task.exception()  # retrieved here; every waiting get() raises it
        self._wake()

    async def _ensure_channel(self) -> AbstractChannel:
        async with self._channel_lock:
            if self._channel.is_closed:
                channel = await self._client._open_channel(prefetch=self._prefetch)
                self._channel = channel
                await self._watch(channel)
            return self._channel

    async def _subscribe(self) -> None:
        client = self._client
        with client._boundary():
            channel = await self._ensure_channel()
            queue = await channel.get_queue(self._queue, ensure=False)
            try:  # on a deleted queue this closes the channel, whose messages went with the queue anyway
                tag = await queue.consume(self._on_message, timeout=client.operation_timeout)
            except ChannelNotFoundEntity as exc:
                raise QueueNotFoundError(self._queue) from exc
            if channel is self._channel and not channel.is_closed:
                self._consumer_tag = tag

    async def _pull(self) -> Delivery | None:
        client = self._client
        with client._boundary():
            channel = await self._ensure_channel()
            queue = await channel.get_queue(self._queue, ensure=False)
            try:
                message = await queue.get(no_ack=False, fail=False, timeout=client.operation_timeout)
            except ChannelNotFoundEntity as exc:
                raise QueueNotFoundError(self._queue) from exc
        return None if message is None else self._hand_out(message)

    def _hand_out(self, message: AbstractIncomingMessage) -> Delivery:
        delivery = _Claim(
            self._queue,
            message.body,
            job_priority(message.priority),
            handle=message,
            delivery_count=_delivery_count(message),
            receiver=self,
        )
        self._held.add(delivery)
        return delivery

    async def _discard_if_idle(self) -> None:
        # A closed receiver keeps its channel while it holds messages: acks must go out on that channel.
        if self._closed and not self._held and not self._returning:
            await self._client._discard(self._channel)

    def _abandon(self) -> None:
        """Stop at once, without I/O (the backend is closing its connection, which returns every message)."""
        self._closed = True
        if self._subscribing is not None:
            self._subscribing.cancel()
        self._buffer.clear()
        self._wake()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Until the buffered messages are given back, the channel must stay open even if the held ones settle.
        self._returning += 1
        try:
            self._client._receivers.discard(self)
            if self._subscribing is not None:
                self._subscribing.cancel()
                await asyncio.gather(self._subscribing, return_exceptions=True)
            channel, tag, self._consumer_tag = self._channel, self._consumer_tag, None
            timeout = self._client.operation_timeout
            if tag is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    underlay = await channel.get_underlay_channel()
                    await underlay.basic_cancel(tag, timeout=timeout)
            # Messages pushed but not handed out go back (re-published, see _return); so do late arrivals.
            buffered, self._buffer = list(self._buffer), deque()
            for message in buffered:
                with contextlib.suppress(Exception):
                    await self._client._return(message, self._queue)
        finally:
            self._returning -= 1
        self._wake()
        if not self._held and not self._returning:
            await self._client._discard(channel)
        elif buffered and not channel.is_closed:
            # The channel stays open for the held ones: one round trip, so the broker has the others back
            # by the time close() returns.
            with contextlib.suppress(Exception):
                await channel.set_qos(prefetch_count=self._prefetch, timeout=timeout)


class RabbitMQClient(Backend):
    """RabbitMQ backend: durable priority queues, persistent messages, publisher confirms, manual acks.

    Jobs are published to the durable direct exchange ``mindtrace.jobs`` with the queue name as routing key;
    each queue is declared durable (by default) with ``x-max-priority=19`` (see BROKER_MAX_PRIORITY) and
    bound under its own name, so priority order holds and a publish to an undeclared queue comes back as
    QueueNotFoundError. ``publish`` returns only once the broker confirmed the message; a missing confirm
    raises PublishError.

    A claimed message is held until settled; if its consumer or connection dies the broker delivers it again
    (no lease timeout). Retries wait in per-delay queues ``<queue>:retry:<ms>`` that hand the job back when
    its delay has passed. The connection reconnects by itself (aio-pika robust connection) and receivers
    subscribe again; jobs in flight at a disconnect run again. The password never appears in ``repr``,
    ``describe()`` or error messages.

    TLS (``ssl=True``, or an ``amqps://`` URL) verifies the broker's certificate and host name against the
    system's trusted CAs, against the CA bundle file ``ssl_ca_certs`` (which implies TLS; also
    ``amqps://...?ssl_ca_certs=/path/ca.pem``), or as the ``ssl_context`` you pass (for a client certificate,
    say) dictates. Pass ``ssl_ca_certs`` or ``ssl_context``, not both.
    """

    schemes = ("amqp", "amqps")

    # Classic queues only flag a redelivery, so the consumer counts lost runs on the job itself.
    counts_deliveries = False

    def __init__(
        self,
        host: str = "localhost",
        port: int = 5672,
        username: str = "guest",
        password: str = "guest",
        virtual_host: str = "/",
        *,
        ssl: bool = False,
        ssl_context: _ssl.SSLContext | None = None,
        ssl_ca_certs: str | None = None,
        heartbeat: int = AMQP_HEARTBEAT,
        operation_timeout: float = OPERATION_TIMEOUT,
        reconnect_interval: float = AMQP_RECONNECT_INTERVAL,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        super().__init__(max_payload_bytes=max_payload_bytes)
        if not host:
            raise ConfigurationError("host must not be empty")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigurationError(f"port must be an int in 1..65535, not {port!r}")
        if not isinstance(heartbeat, int) or heartbeat < 0:
            raise ConfigurationError(f"heartbeat must be an int >= 0 (seconds; 0 turns it off), not {heartbeat!r}")
        if not operation_timeout > 0 or not reconnect_interval > 0:
            raise ConfigurationError("operation_timeout and reconnect_interval must be positive")
        if not virtual_host:
            raise ConfigurationError("virtual_host must not be empty (the default one is '/')")
        if ssl_ca_certs is not None:
            if ssl_context is not None:
                raise ConfigurationError("pass ssl_ca_certs or ssl_context, not both")
            try:
                ssl_context = _ssl.create_default_context(cafile=ssl_ca_certs)
            except (OSError, _ssl.SSLError) as exc:
                raise ConfigurationError(f"cannot load the CA bundle ssl_ca_certs={ssl_ca_certs!r}: {exc}") from exc
        self.host = host
        self.port = port
        self.username = username
        self._password = _Secret(password)
        self.virtual_host = virtual_host
        self.ssl = ssl or ssl_context is not None
        self.ssl_ca_certs = ssl_ca_certs
        self._ssl_context = ssl_context
        self.heartbeat = heartbeat
        self.operation_timeout = operation_timeout
        self.reconnect_interval = reconnect_interval
        self._connection: aio_pika.RobustConnection | None = None
        self._idle_channels: list[AbstractChannel] = []
        self._publish_channel: AbstractChannel | None = None
        self._publish_lock = asyncio.Lock()
        self._receivers: set[_RabbitMQReceiver] = set()

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RabbitMQClient:
        """A client for ``amqp://user:password@host:port/vhost`` (``amqps://`` for TLS).

        Omitted parts take the defaults (guest/guest, port 5672 or 5671, vhost ``/``); the vhost is
        percent-decoded (``%2F`` is ``/``) and an empty path means ``/``. Query options: ``?heartbeat=N``, and
        with ``amqps://`` ``?ssl_ca_certs=/path/ca.pem`` (percent-encoded). Keyword arguments go to the
        constructor and win over the URL.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        where = f"{scheme}://{parts.hostname or ''}"
        if scheme not in cls.schemes:
            raise ConfigurationError(f"not an AMQP URL (amqp:// or amqps://): {where}")
        try:
            port = parts.port
        except ValueError:
            raise ConfigurationError(f"invalid port in AMQP URL {where}") from None
        options: dict[str, Any] = {
            "host": parts.hostname or "localhost",
            "port": port or (5671 if scheme == "amqps" else 5672),
            "username": unquote(parts.username) if parts.username is not None else "guest",
            "password": unquote(parts.password) if parts.password is not None else "guest",
            "virtual_host": unquote(parts.path[1:]) if parts.path not in ("", "/") else "/",
            "ssl": scheme == "amqps",
        }
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in _URL_OPTIONS:
                raise ConfigurationError(
                    f"unknown option {key!r} in AMQP URL {where}; known: {', '.join(_URL_OPTIONS)}"
                )
            if key == "ssl_ca_certs":
                if scheme != "amqps":
                    raise ConfigurationError(f"option ssl_ca_certs needs an amqps:// URL, not {where}")
                options[key] = value
                continue
            try:
                options[key] = int(value)
            except ValueError:
                raise ConfigurationError(f"option {key} in AMQP URL {where} must be an integer") from None
        options.update(kwargs)
        return cls(**options)

    def describe(self) -> str:
        """``amqp://host:port/vhost``, without credentials."""
        scheme = "amqps" if self.ssl else "amqp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        vhost = "" if self.virtual_host == "/" else quote(self.virtual_host, safe="")
        return f"{scheme}://{host}:{self.port}/{vhost}"

    # -- connection and channels ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _boundary(self) -> Iterator[None]:
        """The one place driver errors become ours: connection trouble, then any other AMQP error."""
        try:
            with translate_driver_errors(
                host=self.host, port=self.port, backend=self.describe(), connection_errors=_CONNECTION_ERRORS
            ):
                try:
                    yield
                except asyncio.TimeoutError as exc:
                    raise BackendUnavailableError(
                        f"no answer from {self.describe()} within {self.operation_timeout:g}s",
                        host=self.host,
                        port=self.port,
                        backend=self.describe(),
                    ) from exc
        except JobsError:
            raise
        except AMQPError as exc:
            raise BackendError(f"{self.describe()}: {type(exc).__name__}: {exc}", backend=self.describe()) from exc
        except Exception as exc:
            if not _lost_connection(exc):
                raise
            raise BackendUnavailableError(
                f"lost the connection to {self.describe()} during the operation: {type(exc).__name__}: {exc}",
                host=self.host,
                port=self.port,
                backend=self.describe(),
            ) from exc

    async def _timed(self, operation: Awaitable[_T]) -> _T:
        """``operation`` bounded by ``operation_timeout`` (TimeoutError), without a task per call on 3.11+."""
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(self.operation_timeout):
                return await operation
        return await asyncio.wait_for(operation, self.operation_timeout)

    async def _connect(self) -> None:
        url = make_url(
            host=self.host,
            port=self.port,
            login=self.username,
            password=self._password.reveal(),
            virtualhost=self.virtual_host,
            ssl=self.ssl,
            heartbeat=self.heartbeat,
            reconnect_interval=self.reconnect_interval,
        )
        # reconnect_interval again as a keyword: aio-pika 9 ignores the URL's options when given any keyword.
        connection = aio_pika.RobustConnection(
            url,
            ssl_context=self._ssl_context,
            client_properties={"connection_name": "mindtrace.jobs"},
            reconnect_interval=self.reconnect_interval,
        )
        try:
            with translate_driver_errors(
                host=self.host,
                port=self.port,
                backend=self.describe(),
                connection_errors=(*CONNECTION_EXCEPTIONS, asyncio.TimeoutError),
            ):
                try:
                    await connection.connect(timeout=self.operation_timeout)
                except (AuthenticationError, ProbableAuthenticationError) as exc:
                    # The broker answered and refused the login: unlike an unreachable broker, waiting cannot help.
                    raise BackendError(
                        f"{self.describe()} refused the credentials: {exc}", backend=self.describe()
                    ) from exc
        except BaseException:
            await self._close_connection(connection)
            raise
        self._connection = connection
        try:
            with self._boundary():
                async with self._ops_channel() as channel:
                    await channel.declare_exchange(
                        EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True, timeout=self.operation_timeout
                    )
        except BaseException:
            self._connection = None
            await self._close_connection(connection)
            raise

    async def _close_connection(self, connection: aio_pika.RobustConnection) -> None:
        with contextlib.suppress(Exception):
            await self._timed(connection.close())

    async def _close(self) -> None:
        for receiver in list(self._receivers):
            receiver._abandon()
        self._receivers.clear()
        connection, self._connection = self._connection, None
        self._idle_channels.clear()
        self._publish_channel = None
        if connection is not None:
            await self._close_connection(connection)

    async def _ready_connection(self) -> aio_pika.RobustConnection:
        connection = self._connection
        if connection is None or self._closed:
            raise ClosedError(f"{self.describe()} is closed")
        if not connection.connected.is_set():
            try:
                await self._timed(connection.ready())
            except asyncio.TimeoutError:
                raise BackendUnavailableError(
                    f"lost the connection to {self.describe()} and could not reconnect within "
                    f"{self.operation_timeout:g}s",
                    host=self.host,
                    port=self.port,
                    backend=self.describe(),
                ) from None
        return connection

    async def _open_channel(self, *, confirms: bool = False, prefetch: int | None = None) -> AbstractChannel:
        """A new channel; with ``confirms``, publishes wait for the broker's ack and unroutable ones raise."""
        connection = await self._ready_connection()
        channel = Channel(connection, publisher_confirms=confirms, on_return_raises=confirms)
        try:
            await self._timed(channel.initialize())
            if prefetch is not None:
                await channel.set_qos(prefetch_count=prefetch, timeout=self.operation_timeout)
        except BaseException:
            await self._discard(channel)
            raise
        return channel

    async def _discard(self, channel: AbstractChannel) -> None:
        if not channel.is_closed:
            with contextlib.suppress(Exception):
                await self._timed(channel.close())

    @contextlib.asynccontextmanager
    async def _ops_channel(self) -> AsyncIterator[AbstractChannel]:
        """A channel for one operation at a time: an error that closes it (404, 406) harms nothing else."""
        channel = None
        while self._idle_channels and channel is None:
            candidate = self._idle_channels.pop()
            if not candidate.is_closed:
                channel = candidate
        if channel is None:
            channel = await self._open_channel()
        reusable = False
        try:
            yield channel
            reusable = True
        finally:
            if reusable and not channel.is_closed and not self._closed and len(self._idle_channels) < _IDLE_CHANNELS:
                self._idle_channels.append(channel)
            else:
                await self._discard(channel)

    async def _publisher(self) -> AbstractChannel:
        channel = self._publish_channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._publish_lock:
            channel = self._publish_channel
            if channel is None or channel.is_closed:
                channel = self._publish_channel = await self._open_channel(confirms=True)
            return channel

    # -- publishing ----------------------------------------------------------------------------------

    async def _send(
        self,
        exchange: str,
        routing_key: str,
        queue: str,
        message: OutgoingMessage,
        *,
        expiration_ms: int = 0,
    ) -> None:
        """Publish one persistent message (mandatory) and wait for the broker's confirm.

        A message that ``resumes`` a cut-short run goes ahead of the jobs waiting at its priority, as it
        would on Redis (see :func:`broker_priority`).

        ``queue`` is the queue the caller means, for errors. A message nothing was sent of is sent again
        once on a fresh channel (after a reconnect); one that was sent is never sent twice.
        """
        properties = spec.Basic.Properties(
            delivery_mode=2,
            priority=broker_priority(message.priority, resumes=message.resumes),
            expiration=str(expiration_ms) if expiration_ms else None,
        )
        for attempt in (1, 2):
            with self._boundary():
                channel = await self._publisher()
                underlay = await channel.get_underlay_channel()
            try:
                await underlay.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=True,
                    timeout=self.operation_timeout,
                )
                return
            except aiormq.exceptions.PublishError as exc:
                if getattr(exc.frame, "reply_code", None) == _NO_ROUTE:
                    raise QueueNotFoundError(queue) from exc
                raise self._publish_error(queue, message, exc) from exc
            except ChannelInvalidStateError:
                # Raised before anything was written: the channel (or its connection) had closed.
                if attempt == 2:
                    with self._boundary():
                        raise
            except Exception as exc:
                raise self._publish_error(queue, message, exc) from exc

    def _publish_error(self, queue: str, message: OutgoingMessage, exc: BaseException) -> PublishError:
        reason = "no confirm in time" if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
        return PublishError(
            f"{self.describe()} did not confirm job {message.job_id!r} for queue {queue!r} ({reason}); "
            "it may or may not be queued",
            queue=queue,
            job_id=message.job_id,
            backend=self.describe(),
        )

    async def _publish(self, queue: str, message: OutgoingMessage) -> None:
        await self._send(EXCHANGE, queue, queue, message)

    async def _publish_many(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        # Confirms are pipelined: a window of messages is written in order before their confirms are awaited.
        for start in range(0, len(messages), _PUBLISH_WINDOW):
            window = messages[start : start + _PUBLISH_WINDOW]
            results = await asyncio.gather(
                *(self._send(EXCHANGE, queue, queue, message) for message in window), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    # -- queues --------------------------------------------------------------------------------------

    async def _declare_queue(self, queue: str, options: QueueOptions) -> None:
        timeout = self.operation_timeout
        with self._boundary():
            async with self._ops_channel() as channel:
                try:
                    declared = await channel.declare_queue(
                        queue,
                        durable=options.durable,
                        arguments={"x-max-priority": BROKER_MAX_PRIORITY},
                        timeout=timeout,
                    )
                except ChannelPreconditionFailed as exc:
                    raise QueueConflictError(
                        f"queue {queue!r} already exists with other options than {options} "
                        f"(or was not created by mindtrace.jobs): {exc}",
                        queue=queue,
                    ) from exc
                await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True, timeout=timeout)
                await declared.bind(EXCHANGE, routing_key=queue, timeout=timeout)

    async def _queue_exists(self, queue: str) -> bool:
        with self._boundary():
            async with self._ops_channel() as channel:
                try:
                    await channel.declare_queue(queue, passive=True, timeout=self.operation_timeout)
                except ChannelNotFoundEntity:
                    return False
                return True

    async def _count(self, queue: str) -> int:
        with self._boundary():
            async with self._ops_channel() as channel:
                try:
                    declared = await channel.declare_queue(queue, passive=True, timeout=self.operation_timeout)
                except ChannelNotFoundEntity as exc:
                    raise QueueNotFoundError(queue) from exc
                return int(declared.declaration_result.message_count or 0)

    async def _purge(self, queue: str) -> int:
        with self._boundary():
            async with self._ops_channel() as channel:
                underlay = await channel.get_underlay_channel()
                try:
                    result = await underlay.queue_purge(queue, timeout=self.operation_timeout)
                except ChannelNotFoundEntity as exc:
                    raise QueueNotFoundError(queue) from exc
                return int(result.message_count or 0)

    async def _delete_queue(self, queue: str) -> None:
        with self._boundary():
            async with self._ops_channel() as channel:
                underlay = await channel.get_underlay_channel()
                # Any retry queue may exist (another process may have made it): delete each without waiting;
                # the broker answers the final delete only after it handled every one before it.
                for bucket in RETRY_BUCKETS_MS:
                    await _queue_delete_nowait(underlay, retry_queue_name(queue, bucket), self.operation_timeout)
                await underlay.queue_delete(queue, timeout=self.operation_timeout)

    async def _declare_retry_queue(self, queue: str, bucket_ms: int) -> str:
        # Declared on every retry: that renews its x-expires, which counts from the last declare.
        name = retry_queue_name(queue, bucket_ms)
        with self._boundary():
            async with self._ops_channel() as channel:
                await channel.declare_queue(
                    name,
                    durable=True,
                    arguments={
                        "x-dead-letter-exchange": EXCHANGE,
                        "x-dead-letter-routing-key": queue,
                        "x-expires": bucket_ms + _RETRY_QUEUE_GRACE_MS,
                    },
                    timeout=self.operation_timeout,
                )
        return name

    # -- claiming and settling -----------------------------------------------------------------------

    async def _open_receiver(self, queue: str, prefetch: int) -> Receiver:
        if not await self._queue_exists(queue):
            raise QueueNotFoundError(queue)
        with self._boundary():
            channel = await self._open_channel(prefetch=prefetch)
        receiver = _RabbitMQReceiver(self, queue, prefetch, channel)
        try:
            with self._boundary():
                await receiver._watch(channel)
        except BaseException:
            await self._discard(channel)
            raise
        self._receivers.add(receiver)
        return receiver

    @staticmethod
    def _message(delivery: Delivery) -> AbstractIncomingMessage:
        message: AbstractIncomingMessage = delivery.handle
        return message

    async def _settled(self, delivery: Delivery) -> None:
        receiver = delivery.receiver if isinstance(delivery, _Claim) else None
        if receiver is not None:
            receiver._held.discard(delivery)
            if receiver._closed:  # only a closed receiver has anything to do (see _discard_if_idle)
                await receiver._discard_if_idle()

    def _check_held(self, delivery: Delivery) -> None:
        if not _on_open_channel(self._message(delivery)):
            raise LeaseLostError(queue=delivery.queue, job_id=None, backend=self.describe())

    async def _ack(self, delivery: Delivery) -> None:
        try:
            self._check_held(delivery)
            # No operation_timeout here: basic.ack has no answer from the broker. aio-pika's ack() only waits
            # for the connection's writer to hand the frame to the socket; a socket that stops draining is a
            # dead connection, which the heartbeat closes, failing the ack (as a lost connection) with it.
            try:
                await self._message(delivery).ack()
            except Exception:
                with self._boundary():  # translated only on failure: no context manager per ack
                    raise
        finally:
            await self._settled(delivery)

    async def _release(self, delivery: Delivery) -> None:
        try:
            message = self._message(delivery)
            if _on_open_channel(message):  # else the closed channel gave it back already
                await self._return(message, delivery.queue)
        finally:
            await self._settled(delivery)

    async def _return(self, message: AbstractIncomingMessage, queue: str) -> None:
        """Give a held message back to ``queue`` without it counting as a lost run.

        A nack would set the redelivered flag, which the consumer must read as a lost run. Giving a job back
        (a stop, a cancelled task, a prefetched message never handed out) is not one: publish the same bytes
        again, confirmed, and ack the original. The job goes ahead of the jobs waiting at its priority. If the
        publish fails, nack instead: the redelivery is then charged one attempt, but the job is never lost.
        """
        if not _on_open_channel(message):
            return  # its channel closed: the broker has it back already (a copy would be a duplicate)
        copy = OutgoingMessage(message.body, job_priority(message.priority), message.message_id or "", resumes=True)
        try:
            await self._send(EXCHANGE, queue, queue, copy)
        except Exception:
            with self._boundary():
                await self._timed(message.nack(requeue=True))
            return
        with contextlib.suppress(Exception):
            await self._timed(message.ack())

    async def _give_back(self, delivery: Delivery) -> None:
        """Best effort after a failed settle: the message must not stay held (it would block the prefetch)."""
        with contextlib.suppress(Exception):
            await self._timed(self._message(delivery).nack(requeue=True))
        await self._settled(delivery)

    async def _retry(self, delivery: Delivery, message: OutgoingMessage, delay: float) -> None:
        self._check_held(delivery)
        try:
            if delay <= 0:
                await self._send(EXCHANGE, delivery.queue, delivery.queue, message)
            else:
                bucket_ms, delay_ms = retry_bucket(delay)
                name = await self._declare_retry_queue(delivery.queue, bucket_ms)
                await self._send("", name, delivery.queue, message, expiration_ms=delay_ms)
        except BaseException:
            await self._give_back(delivery)
            raise
        await self._ack(delivery)

    async def _dead_letter(self, delivery: Delivery, dead_letter_queue: str, message: OutgoingMessage) -> None:
        self._check_held(delivery)
        try:
            try:
                await self._send(EXCHANGE, dead_letter_queue, dead_letter_queue, message)
            except QueueNotFoundError:
                # The dead-letter queue was deleted on its own: make it again rather than lose the job.
                await self._declare_queue(dead_letter_queue, QueueOptions())
                await self._send(EXCHANGE, dead_letter_queue, dead_letter_queue, message)
        except BaseException:
            await self._give_back(delivery)
            raise
        await self._ack(delivery)


__all__ = ["EXCHANGE", "RETRY_BUCKETS_MS", "RabbitMQClient", "retry_bucket", "retry_queue_name"]
