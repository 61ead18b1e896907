"""RabbitMQClient: jobs over AMQP 0-9-1 with a robust connection, publisher confirms and priority queues.

The package by noun: ``connection`` (the two robust connections, channels, error boundary), ``publisher``
(confirmed publishing), ``receiver`` (claiming, one channel per running job), ``topology`` (exchange, queue
arguments, priorities), ``delays`` (the delay chain: delayed publishes and retry delays), ``conditions``
(refusals, an unreachable broker, resource alarms, consumer_timeout, in words a user can act on), ``compat``
(what differs on aio-pika 9 / aiormq 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as _ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelLockedResource, ChannelNotFoundEntity, ChannelPreconditionFailed

from mindtrace.jobs.backends._endpoint import Endpoint, Option, ca_bundle_context, split_url
from mindtrace.jobs.backends.base import (
    PRIORITY_LEVELS,
    Backend,
    Capabilities,
    Delivery,
    OutgoingMessage,
    QueueOptions,
    QueueStats,
    Receiver,
    dead_letter_queue_name,
)
from mindtrace.jobs.backends.rabbitmq.connection import _Channels, _on_open_channel, _Secret
from mindtrace.jobs.backends.rabbitmq.delays import MAX_DELAY_MS, UNROUTABLE_QUEUE, _DelayChain
from mindtrace.jobs.backends.rabbitmq.publisher import _Publisher
from mindtrace.jobs.backends.rabbitmq.receiver import _Claim, _job_id, _RabbitMQReceiver
from mindtrace.jobs.backends.rabbitmq.topology import (
    EXCHANGE,
    REGISTRY_LOCK,
    REGISTRY_QUEUE,
    queue_arguments,
)
from mindtrace.jobs.constants import (
    AMQP_HEARTBEAT,
    AMQP_RECONNECT_INTERVAL,
    CONNECT_TIMEOUT,
    MAX_PAYLOAD_BYTES,
    OPERATION_TIMEOUT,
)
from mindtrace.jobs.errors import (
    ConfigurationError,
    LeaseLostError,
    QueueConflictError,
    QueueNotFoundError,
)
from mindtrace.jobs.lifecycle import StateUpdate

if TYPE_CHECKING:
    from mindtrace.jobs.backends.rabbitmq.schedules import RabbitMQScheduleStore
    from mindtrace.jobs.state.rabbitmq import RabbitMQStateStore

logger = logging.getLogger("mindtrace.jobs")

# publish_many sends this many messages before it waits for their confirms.
_PUBLISH_WINDOW: Final = 256

#: Query options ``from_url`` takes: ``heartbeat`` (an int), ``connect_timeout`` (seconds), ``jobs_per_channel``
#: (an int) and ``schedules_namespace`` (a name) anywhere, ``ssl_ca_certs`` (a path) with amqps:// only.
_URL_OPTIONS: Final[dict[str, Option]] = {
    "heartbeat": (int, "an integer"),
    "connect_timeout": (float, "a number"),
    "jobs_per_channel": (int, "an integer"),
    "schedules_namespace": (str, "a name"),
}
_URL_TLS_OPTIONS: Final = ("ssl_ca_certs",)


class RabbitMQClient(Backend):
    """RabbitMQ backend: durable priority queues, persistent messages, publisher confirms, manual acks.

    Jobs are published to the durable direct exchange ``mindtrace.jobs`` with the queue name as routing key;
    each queue is declared durable (by default) with ``x-max-priority=19`` (see BROKER_MAX_PRIORITY in
    ``topology``) and bound under its own name, so priority order holds and a publish to an undeclared queue
    comes back as QueueNotFoundError. ``publish`` returns only once the broker confirmed the message; a missing confirm
    raises PublishError.

    A claimed message is held until settled; if its consumer or connection dies the broker delivers it again
    (no lease timeout). Delayed publishes and retry delays wait in the vhost's delay chain (see ``delays``):
    fixed-TTL queues that hand the job to its queue when its delay has passed, exact to a millisecond plus the
    broker's hops; a job due for a queue deleted meanwhile lands in ``mindtrace.jobs:unroutable``. Publishes
    go out on a connection of their own, so that a resource alarm, which blocks connections that publish,
    never stops acks. The connections reconnect by themselves (aio-pika
    robust connections) and receivers subscribe again; jobs in flight at a disconnect run again. A broker that
    refuses the login, the vhost or an operation raises BackendRefusedError; one not reached within
    ``connect_timeout`` raises BackendUnavailableError. The password never appears in ``repr``,
    ``describe()`` or error messages.

    ``jobs_per_channel`` (default 1): how many claimed jobs share one consumer channel. The broker's
    ``consumer_timeout`` closes the channel of a delivery unacked for too long and requeues everything that
    channel holds, so with 1 an overrunning job takes back only itself. A larger value (up to the consumer's
    concurrency) uses fewer channels and drains short jobs faster, at the cost of that isolation.

    ``schedules_namespace`` (default ``mindtrace.jobs``): whose schedules this client stores, lists and fires
    (the stream ``<namespace>:schedules`` and the leader's lock queue ``<namespace>:scheduler.lock``), so that
    applications sharing a vhost keep their schedules apart, as a Redis ``key_prefix`` does.

    TLS (``ssl=True``, or an ``amqps://`` URL) verifies the broker's certificate and host name against the
    system's trusted CAs, against the CA bundle file ``ssl_ca_certs`` (which implies TLS; also
    ``amqps://...?ssl_ca_certs=/path/ca.pem``), or as the ``ssl_context`` you pass (for a client certificate,
    say) dictates. Pass ``ssl_ca_certs`` or ``ssl_context``, not both.
    """

    schemes = ("amqp", "amqps")

    # Classic queues only flag a redelivery, so the consumer counts lost runs on the job itself; delays wait in
    # the delay chain, shared by every queue of the vhost, so a queue's delayed jobs cannot be counted; a queued
    # message cannot be taken out of the middle of a queue; AMQP cannot list queues, so
    # declare_queue writes a registry (REGISTRY_QUEUE). Nor can it publish only if absent: a queue is a log of
    # messages, not keyed by anything (message_id is an opaque property the broker never indexes), so each
    # publish of a job queues another copy. A passive declare counts ready messages and consumers only: claimed
    # (unacked) messages are not visible over AMQP, so ``running`` is unknown.
    capabilities = Capabilities(
        lease_timeout=None,
        counted_deliveries=False,
        exact_delays=True,
        max_delay=None,  # the chain holds MAX_DELAY_MS, beyond MAX_DELAY
        priority_levels=PRIORITY_LEVELS,
        queued_job_removal="tombstone",
        can_list_queues=True,  # from the registry declare_queue writes
        shared_queues=True,
        unique_job_ids=False,
        job_records=True,  # RabbitMQStateStore: a stream per queue on the same broker
        queue_counts=frozenset({"ready", "dead_lettered", "consumers"}),
        # RabbitMQScheduleStore: one process fires, the holder of an exclusive queue; schedules on a stream.
        schedules="leader",
    )

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
        connect_timeout: float = CONNECT_TIMEOUT,
        jobs_per_channel: int = 1,
        operation_timeout: float = OPERATION_TIMEOUT,
        reconnect_interval: float = AMQP_RECONNECT_INTERVAL,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        schedules_namespace: str = "mindtrace.jobs",
    ) -> None:
        super().__init__(max_payload_bytes=max_payload_bytes)
        if (
            not isinstance(schedules_namespace, str)
            or not schedules_namespace
            or len(schedules_namespace) > 200
            or not schedules_namespace.isprintable()
        ):
            raise ConfigurationError(
                f"schedules_namespace must be a non-empty printable name of at most 200 characters, not "
                f"{schedules_namespace!r}"
            )
        #: Whose schedules this client sees and fires: the stream ``<namespace>:schedules`` and the lock queue
        #: ``<namespace>:scheduler.lock`` (several applications on one vhost keep theirs apart with it).
        self.schedules_namespace = schedules_namespace
        if not host:
            raise ConfigurationError("host must not be empty")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigurationError(f"port must be an int in 1..65535, not {port!r}")
        if not isinstance(heartbeat, int) or heartbeat < 0:
            raise ConfigurationError(f"heartbeat must be an int >= 0 (seconds; 0 turns it off), not {heartbeat!r}")
        if not operation_timeout > 0 or not reconnect_interval > 0:
            raise ConfigurationError("operation_timeout and reconnect_interval must be positive")
        if not isinstance(connect_timeout, (int, float)) or not connect_timeout > 0:
            raise ConfigurationError(f"connect_timeout must be a positive number of seconds, not {connect_timeout!r}")
        if not isinstance(jobs_per_channel, int) or isinstance(jobs_per_channel, bool) or jobs_per_channel < 1:
            raise ConfigurationError(f"jobs_per_channel must be an int >= 1, not {jobs_per_channel!r}")
        if not virtual_host:
            raise ConfigurationError("virtual_host must not be empty (the default one is '/')")
        if ssl_ca_certs is not None:
            if ssl_context is not None:
                raise ConfigurationError("pass ssl_ca_certs or ssl_context, not both")
            ssl_context = ca_bundle_context(ssl_ca_certs)
        self.host = host
        self.port = port
        self.username = username
        self._password = _Secret(password)
        self.virtual_host = virtual_host
        self.ssl = ssl or ssl_context is not None
        self.ssl_ca_certs = ssl_ca_certs
        self._ssl_context = ssl_context
        self.heartbeat = heartbeat
        self.connect_timeout = float(connect_timeout)
        self.jobs_per_channel = jobs_per_channel
        self.operation_timeout = operation_timeout
        self.reconnect_interval = reconnect_interval
        self.endpoint = Endpoint("amqp", host, port, username, virtual_host, self.ssl)
        self._channels = _Channels(
            endpoint=self.endpoint,
            password=self._password,
            ssl_context=ssl_context,
            heartbeat=heartbeat,
            connect_timeout=self.connect_timeout,
            operation_timeout=operation_timeout,
            reconnect_interval=reconnect_interval,
            is_closed=lambda: self._closed,
        )
        self._publisher = _Publisher(self._channels)
        self._delays = _DelayChain(self._channels, self._publisher)
        self._receivers: set[_RabbitMQReceiver] = set()
        self._late_returns: set[asyncio.Task[Any]] = set()
        self._state: RabbitMQStateStore | None = None
        self._schedules: RabbitMQScheduleStore | None = None
        self._registry_lock: asyncio.Lock | None = None

    def state_store(self) -> RabbitMQStateStore:
        """This client's job records: a RabbitMQStateStore on the same broker, with its own connections (made once)."""
        if self._state is None:
            from mindtrace.jobs.state.rabbitmq import RabbitMQStateStore

            channels = self._own_channels(
                "mindtrace.jobs records", lambda: self._state is not None and self._state._closed
            )
            self._state = RabbitMQStateStore(channels)
        return self._state

    def schedule_store(self) -> RabbitMQScheduleStore:
        """This client's schedules: a RabbitMQScheduleStore on the same broker, with its own connections (made
        once, closed with the client)."""
        if self._schedules is None:
            from mindtrace.jobs.backends.rabbitmq.schedules import RabbitMQScheduleStore

            channels = self._own_channels(
                "mindtrace.jobs schedules", lambda: self._schedules is not None and self._schedules.closed
            )
            self._schedules = RabbitMQScheduleStore(channels, self.schedules_namespace)
        return self._schedules

    def _own_channels(self, name: str, is_closed: Callable[[], bool]) -> _Channels:
        """Connections of their own for a store of this client (records, schedules), with this client's options."""
        return _Channels(
            endpoint=self.endpoint,
            password=self._password,
            ssl_context=self._ssl_context,
            heartbeat=self.heartbeat,
            connect_timeout=self.connect_timeout,
            operation_timeout=self.operation_timeout,
            reconnect_interval=self.reconnect_interval,
            is_closed=is_closed,
            name=name,
        )

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RabbitMQClient:
        """A client for ``amqp://user:password@host:port/vhost`` (``amqps://`` for TLS).

        Omitted parts take the defaults (guest/guest, port 5672 or 5671, vhost ``/``); the vhost is
        percent-decoded (``%2F`` is ``/``) and an empty path means ``/``. Query options: ``?heartbeat=N``,
        ``?connect_timeout=S`` (seconds), ``?jobs_per_channel=N``, ``?schedules_namespace=NAME``, and with ``amqps://``
        ``?ssl_ca_certs=/path/ca.pem`` (percent-encoded).
        Keyword arguments go to the constructor and win over the URL.
        """
        parts = split_url(url, kind="AMQP", schemes=cls.schemes, options=_URL_OPTIONS, tls_options=_URL_TLS_OPTIONS)
        options: dict[str, Any] = {
            "host": parts.host or "localhost",
            "port": parts.port or (5671 if parts.tls else 5672),
            "username": parts.username if parts.username is not None else "guest",
            "password": parts.password if parts.password is not None else "guest",
            "virtual_host": parts.path or "/",
            "ssl": parts.tls,
            **parts.options,
        }
        options.update(kwargs)
        return cls(**options)

    def describe(self) -> str:
        """``amqp://host:port/vhost``, without credentials."""
        return self.endpoint.describe()

    # -- connection --------------------------------------------------------------------------------

    async def _connect(self) -> None:
        await self._channels.connect()

    async def close(self) -> None:
        """Close connections (see :meth:`Backend.close`), and the schedule store if one was made. Idempotent."""
        try:
            await super().close()
        finally:
            if self._schedules is not None:
                await self._schedules.close()

    async def _close(self) -> None:
        await self._give_back_on_close()
        if self._late_returns:  # late arrivals at receivers already closed, being given back
            await asyncio.wait(set(self._late_returns), timeout=self.operation_timeout)
        for receiver in list(self._receivers):
            receiver.abandon()
        self._receivers.clear()
        await self._channels.close()

    async def _give_back_on_close(self) -> None:
        """Give every held or prefetched message back uncharged, as ``stop()`` does, before the connections close.

        Left to the closing connection, the broker would requeue each with the redelivered flag, which the
        consumer charges as a lost run (a job at ``max_retries=0`` would be dead-lettered). Jobs still running
        are settled here, so their late ack raises ClosedError; the give-back is bounded by
        ``operation_timeout``, after which the rest return as redeliveries.
        """
        receivers = list(self._receivers)
        held = [delivery for receiver in receivers for delivery in receiver.take_unsettled()]
        if not held and not any(receiver.has_pushed() for receiver in receivers):
            return

        async def give_back() -> None:
            # Closing a receiver stops push delivery first (each give-back frees a slot the broker would fill)
            # and gives its prefetched messages back; then the running ones go back.
            await asyncio.gather(*(receiver.close() for receiver in receivers), return_exceptions=True)
            await asyncio.gather(
                *(self._publisher.return_message(self._message(delivery), delivery.queue) for delivery in held),
                return_exceptions=True,
            )

        try:
            await self._channels.timed(give_back())
        except asyncio.TimeoutError:
            logger.warning(
                "closing %s: could not give back %d running job(s) within %gs; the broker redelivers the rest",
                self.describe(),
                len(held),
                self.operation_timeout,
            )

    async def _publish(self, queue: str, message: OutgoingMessage) -> None:
        if message.delay > 0:
            await self._delays.send(queue, message, message.delay)
        else:
            await self._publisher.send(EXCHANGE, queue, queue, message)

    async def _publish_many(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        # Confirms are pipelined: a window of messages is written in order before their confirms are awaited.
        for start in range(0, len(messages), _PUBLISH_WINDOW):
            window = messages[start : start + _PUBLISH_WINDOW]
            results = await asyncio.gather(
                *(self._publish(queue, message) for message in window), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    # -- queues --------------------------------------------------------------------------------------

    async def _declare_queue(self, queue: str, options: QueueOptions) -> None:
        timeout = self.operation_timeout
        with self._channels.boundary():
            async with self._channels.ops_channel() as channel:
                try:
                    declared = await channel.declare_queue(
                        queue,
                        durable=options.durable,
                        arguments=queue_arguments(),
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
        # Bound to the delay chain's exit at every declare, so a queue deleted and declared again takes delayed jobs.
        await self._delays.bind(queue)

    async def _queue_exists(self, queue: str) -> bool:
        with self._channels.boundary():
            async with self._channels.ops_channel() as channel:
                try:
                    await channel.declare_queue(queue, passive=True, timeout=self.operation_timeout)
                except ChannelNotFoundEntity:
                    return False
                return True

    async def _count(self, queue: str) -> int:
        with self._channels.boundary():
            async with self._channels.ops_channel() as channel:
                try:
                    declared = await channel.declare_queue(queue, passive=True, timeout=self.operation_timeout)
                except ChannelNotFoundEntity as exc:
                    raise QueueNotFoundError(queue) from exc
                return int(declared.declaration_result.message_count or 0)

    async def _purge(self, queue: str) -> int:
        with self._channels.boundary():
            async with self._channels.ops_channel() as channel:
                underlay = await channel.get_underlay_channel()
                try:
                    result = await underlay.queue_purge(queue, timeout=self.operation_timeout)
                except ChannelNotFoundEntity as exc:
                    raise QueueNotFoundError(queue) from exc
                return int(result.message_count or 0)

    async def _delete_queue(self, queue: str) -> None:
        # Its delayed jobs stay in the shared delay chain; due after the delete, they land in UNROUTABLE_QUEUE
        # (or in a queue of the same name declared again before they are due).
        self._delays.forget(queue)
        with self._channels.boundary():
            async with self._channels.ops_channel() as channel:
                underlay = await channel.get_underlay_channel()
                await underlay.queue_delete(queue, timeout=self.operation_timeout)

    # -- the registry of queues, stats and peeking -------------------------------------------------------

    async def _register_queue(self, queue: str) -> None:
        # One persistent message per declare, confirmed; duplicates and names of deleted queues are pruned by the
        # next listing, so the registry stays about as long as the list of queues.
        with self._channels.boundary():
            async with self._channels.ops_channel() as channel:
                await channel.declare_queue(REGISTRY_QUEUE, durable=True, timeout=self.operation_timeout)
        await self._publisher.send("", REGISTRY_QUEUE, REGISTRY_QUEUE, OutgoingMessage(queue.encode(), 0, ""))

    async def _list_queues(self) -> list[str]:
        """Read the registry: take every message unacked on a channel of its own (under REGISTRY_LOCK), drop
        (ack) duplicates and names whose queue is gone, and close the channel, which puts the rest back in
        their order. A reader that dies midway loses nothing: its channel's messages go back too."""
        if self._registry_lock is None:
            self._registry_lock = asyncio.Lock()
        async with self._registry_lock:  # the exclusive lock queue is per connection: one reader per process too
            with self._channels.boundary():
                await self._lock_registry()
                try:
                    return await self._read_registry()
                finally:
                    async with self._channels.ops_channel() as channel:
                        await channel.queue_delete(REGISTRY_LOCK, timeout=self.operation_timeout)

    async def _read_registry(self) -> list[str]:
        channel = await self._channels.open_channel()
        try:
            registry = await channel.declare_queue(REGISTRY_QUEUE, durable=True, timeout=self.operation_timeout)
            names: list[str] = []
            while True:
                message = await registry.get(no_ack=False, fail=False, timeout=self.operation_timeout)
                if message is None:
                    return names
                name = message.body.decode(errors="replace")
                if name in names or not await self._queue_exists(name):
                    await message.ack()
                else:
                    names.append(name)
        finally:
            await self._channels.discard(channel)  # the kept names go back, in order

    async def _lock_registry(self) -> None:
        """Declare REGISTRY_LOCK exclusive to this client's connection, waiting while another one holds it."""
        deadline = asyncio.get_running_loop().time() + self.operation_timeout
        while True:
            probe = await self._channels.open_channel()
            try:
                await probe.declare_queue(REGISTRY_LOCK, exclusive=True, timeout=self.operation_timeout)
                return
            except ChannelLockedResource:
                if asyncio.get_running_loop().time() > deadline:
                    raise self.endpoint.unavailable(
                        f"the registry of queues on {self.describe()} stayed locked by another reader for "
                        f"{self.operation_timeout:g}s"
                    ) from None
                await asyncio.sleep(0.05)
            finally:
                await self._channels.discard(probe)

    async def _probe(self, queue: str) -> tuple[int, int] | None:
        """``(ready messages, consumers)`` of ``queue`` by a passive declare, or None when it does not exist."""
        with self._channels.boundary():
            async with self._channels.ops_channel() as channel:
                underlay = await channel.get_underlay_channel()
                try:
                    ok = await underlay.queue_declare(queue, passive=True, timeout=self.operation_timeout)
                except ChannelNotFoundEntity:
                    return None
                return int(ok.message_count or 0), int(ok.consumer_count or 0)

    async def _queue_stats(self, queue: str) -> QueueStats:
        main = await self._probe(queue)
        if main is None:
            raise QueueNotFoundError(queue)
        dlq_name = dead_letter_queue_name(queue)
        dead = (await self._probe(dlq_name) if dlq_name != queue else None) or (0, 0)
        # Delayed jobs wait in the delay chain every queue shares: not countable per queue (delayed is None).
        return QueueStats(queue, main[0], dead_lettered=dead[0], consumers=main[1])

    async def _peek(self, queue: str, limit: int) -> list[bytes]:
        """basic.get without ack, up to ``limit`` times, on a channel of its own; closing it puts every message
        back at its place (RabbitMQ requeues to the original position), flagged as redelivered. While read,
        they are held: another consumer of the queue skips them for those milliseconds."""
        if await self._probe(queue) is None:
            raise QueueNotFoundError(queue)
        bodies: list[bytes] = []
        with self._channels.boundary():
            channel = await self._channels.open_channel()
            try:
                source = await channel.get_queue(queue, ensure=False)
                while len(bodies) < limit:
                    message = await source.get(no_ack=False, fail=False, timeout=self.operation_timeout)
                    if message is None:
                        break
                    bodies.append(message.body)
            finally:
                await self._channels.discard(channel)
        return bodies

    # -- claiming and settling -----------------------------------------------------------------------

    async def _open_receiver(self, queue: str, prefetch: int, worker: str | None = None) -> Receiver:
        if not await self._queue_exists(queue):
            raise QueueNotFoundError(queue)
        per_lane = min(self.jobs_per_channel, prefetch)  # each lane's QoS (see _RabbitMQReceiver)
        with self._channels.boundary():
            channel = await self._channels.open_channel(prefetch=per_lane)
        receiver = _RabbitMQReceiver(
            self,
            queue,
            prefetch,
            channel,
            per_lane=per_lane,
            channels=self._channels,
            publisher=self._publisher,
            forget=self._receivers.discard,
            late_returns=self._late_returns,
        )
        try:
            with self._channels.boundary():
                await receiver.watch(channel)
        except BaseException:
            await self._channels.discard(channel)
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
            await receiver.settled(delivery)

    def _check_held(self, delivery: Delivery) -> None:
        message = self._message(delivery)
        if not _on_open_channel(message):
            raise LeaseLostError(queue=delivery.queue, job_id=_job_id(message), backend=self.describe())

    async def _ack(self, delivery: Delivery, state: StateUpdate | None = None) -> None:
        try:
            self._check_held(delivery)
            # No operation_timeout here: basic.ack has no answer from the broker. aio-pika's ack() only waits
            # for the connection's writer to hand the frame to the socket; a socket that stops draining is a
            # dead connection, which the heartbeat closes, failing the ack (as a lost connection) with it.
            try:
                await self._message(delivery).ack()
            except Exception:
                with self._channels.boundary():  # translated only on failure: no context manager per ack
                    raise
        finally:
            await self._settled(delivery)

    async def _release(self, delivery: Delivery, state: StateUpdate | None = None) -> None:
        try:
            message = self._message(delivery)
            if _on_open_channel(message):  # else the closed channel gave it back already
                await self._publisher.return_message(message, delivery.queue)
        finally:
            await self._settled(delivery)

    async def _give_back(self, delivery: Delivery) -> None:
        """Best effort after a failed settle: the message must not stay held (it would block the prefetch)."""
        with contextlib.suppress(Exception):
            await self._channels.timed(self._message(delivery).nack(requeue=True))
        await self._settled(delivery)

    async def _retry(
        self, delivery: Delivery, message: OutgoingMessage, delay: float, state: StateUpdate | None = None
    ) -> None:
        self._check_held(delivery)
        try:
            if delay <= 0:
                await self._publisher.send(EXCHANGE, delivery.queue, delivery.queue, message)
            else:
                await self._delays.send(delivery.queue, message, delay)
        except BaseException:
            await self._give_back(delivery)
            raise
        await self._ack(delivery)

    async def _dead_letter(
        self, delivery: Delivery, dead_letter_queue: str, message: OutgoingMessage, state: StateUpdate | None = None
    ) -> None:
        self._check_held(delivery)
        try:
            try:
                await self._publisher.send(EXCHANGE, dead_letter_queue, dead_letter_queue, message)
            except QueueNotFoundError:
                # The dead-letter queue was deleted on its own: make it again rather than lose the job.
                await self._declare_queue(dead_letter_queue, QueueOptions())
                await self._publisher.send(EXCHANGE, dead_letter_queue, dead_letter_queue, message)
        except BaseException:
            await self._give_back(delivery)
            raise
        await self._ack(delivery)


__all__ = ["EXCHANGE", "MAX_DELAY_MS", "UNROUTABLE_QUEUE", "RabbitMQClient"]
