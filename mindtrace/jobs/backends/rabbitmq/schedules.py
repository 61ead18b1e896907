"""RabbitMQScheduleStore: schedules as events on one RabbitMQ stream, fired by the holder of an exclusive queue."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.connection import make_url
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq import spec
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import (
    ChannelInvalidStateError,
    ChannelLockedResource,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)
from pydantic import ValidationError

from mindtrace.jobs.backends.base import ScheduleMode
from mindtrace.jobs.backends.rabbitmq import conditions
from mindtrace.jobs.backends.rabbitmq.compat import _on_consumer_cancel
from mindtrace.jobs.backends.rabbitmq.topology import EXCHANGE
from mindtrace.jobs.errors import BackendError, BackendRefusedError, BackendUnavailableError, ClosedError
from mindtrace.jobs.schedules import ScheduleSpec, ScheduleState, ScheduleStore

if TYPE_CHECKING:
    from mindtrace.jobs.backends.rabbitmq.connection import _Channels

logger = logging.getLogger("mindtrace.jobs")

_T = TypeVar("_T")

#: The durable stream queue holding every schedule event of the vhost (puts, tombstones, cursors, snapshots).
SCHEDULES_STREAM: Final = f"{EXCHANGE}:schedules"

#: The exclusive, auto-delete queue whose holder (one connection at a time) alone fires schedules.
SCHEDULER_LOCK: Final = f"{EXCHANGE}:scheduler.lock"

#: The stream keeps about this many bytes (whole segments are dropped, oldest first).
STREAM_MAX_BYTES: Final = 20_000_000

#: Size of one stream segment: the unit the broker drops when the stream is over ``STREAM_MAX_BYTES``.
STREAM_SEGMENT_BYTES: Final = 1_000_000

#: The leader writes a snapshot of the whole fold after this many events (of any process) since the last one,
#: so that the segments the stream drops only ever hold events a later snapshot repeats.
SNAPSHOT_EVERY: Final = 500

# Stream messages the broker may push to the consumer before it acks (stream credit); acks go for many at once.
_PREFETCH: Final = 1000
_ACK_EVERY: Final = 250

# AMQP reply code of a mandatory message that no queue was bound to receive (the stream was deleted).
_NO_ROUTE: Final = 312

# Seconds between tries to take the lock while another process holds it; retries after errors back off to the cap.
_LOCK_RETRY: Final = 1.0
_RETRY_BASE, _RETRY_CAP = 0.1, 5.0

# What the driver raises when the broker cannot be reached or a connection goes away.
_CONNECTION_ERRORS: Final = (*CONNECTION_EXCEPTIONS, asyncio.TimeoutError, ChannelInvalidStateError)

#: A put's version: (ms since the epoch, a random tie-breaker); the greater one wins, whatever the order read.
Version = tuple[int, str]


def stream_arguments() -> dict[str, Any]:
    """The arguments the schedules stream is declared with: a stream bounded to ``STREAM_MAX_BYTES``."""
    return {
        "x-queue-type": "stream",
        "x-max-length-bytes": STREAM_MAX_BYTES,
        "x-stream-max-segment-size-bytes": STREAM_SEGMENT_BYTES,
    }


class _NotReady(Exception):
    """The broker refused to consume the stream for now (just declared, its member not started yet)."""


class _StreamGone(Exception):
    """The stream was deleted under a publish."""


@dataclass
class _Fold:
    """What this process knows of the stream: per name the newest put (a spec, or None for a tombstone) with
    its version, and the greatest cursor seen. Every rule is a maximum, so events fold to the same result in
    any order, any number of times."""

    specs: dict[str, tuple[Version, ScheduleSpec | None]] = field(default_factory=dict)
    cursors: dict[str, int] = field(default_factory=dict)
    #: Events folded since the last snapshot (of any process).
    since_snapshot: int = 0

    def put(self, name: str, version: Version, spec: ScheduleSpec | None) -> bool:
        """Keep ``spec`` (None: a tombstone) under ``name`` if ``version`` is newer; whether it was."""
        current = self.specs.get(name)
        if current is not None and current[0] >= version:
            return False
        self.specs[name] = (version, spec)
        return True

    def cursor(self, name: str, ms: int) -> None:
        """Note that ``name``'s fires up to ``ms`` were handled."""
        if ms > self.cursors.get(name, ms - 1):
            self.cursors[name] = ms

    def live(self, name: str) -> ScheduleSpec | None:
        """The stored spec of ``name``, or None when it has none or was removed."""
        current = self.specs.get(name)
        return None if current is None else current[1]

    def version(self, name: str) -> Version | None:
        """The version of ``name``'s newest put (or tombstone), if any."""
        current = self.specs.get(name)
        return None if current is None else current[0]

    def snapshot(self) -> dict[str, Any]:
        """The whole fold as one event."""
        return {
            "op": "snapshot",
            "specs": {
                name: [list(version), None if spec is None else spec.model_dump(mode="json")]
                for name, (version, spec) in self.specs.items()
            },
            "cursors": dict(self.cursors),
        }


def _set_on_close(event: asyncio.Event, *_: Any) -> None:
    event.set()


def _version(value: Any) -> Version:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"a version is [ms, id], not {value!r}")
    ms, tie = value
    if not isinstance(ms, int) or isinstance(ms, bool) or not isinstance(tie, str):
        raise ValueError(f"a version is [ms, id], not {value!r}")
    return ms, tie


def _spec(value: Any) -> ScheduleSpec | None:
    return None if value is None else ScheduleSpec.model_validate(value)


def _ms(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"a cursor is an int of ms, not {value!r}")
    return value


class RabbitMQScheduleStore(ScheduleStore):
    """Schedules on RabbitMQ alone: every change is an event on the stream ``mindtrace.jobs:schedules``, which
    each process folds; the process that holds the exclusive queue ``mindtrace.jobs:scheduler.lock`` fires.

    Events (JSON): a put ``{"op": "put", "name", "v": [ms, id], "spec"}`` (``spec`` null: a tombstone, the
    schedule removed), a cursor ``{"op": "cursor", "name", "ms"}`` (the fires of ``name`` up to ``ms`` were
    handled), a barrier, and a snapshot of the whole fold. The fold keeps, per name, the put of the greatest
    version and the greatest cursor, and merges a snapshot by the same rules, so it does not depend on the
    order events are read in, and a stale snapshot never undoes a newer put. Tombstones are kept, so an old
    put read after one cannot bring the schedule back. A write reads the fold up to a barrier first and
    versions its put after what it found, so a change ordered after another (in any process) wins over it.

    The stream is bounded (``STREAM_MAX_BYTES``, in segments of ``STREAM_SEGMENT_BYTES``): the leader writes a
    snapshot when it takes the lead and after every ``SNAPSHOT_EVERY`` events, so the oldest segments only hold
    what a later snapshot repeats (while no process leads, nothing compacts the stream; and the fold, snapshots
    included, must stay well under the bound).

    Leadership is the lock queue, declared exclusive on a connection of its own that is not robust: the broker
    deletes the queue when that connection closes (the process died, the network cut it after missed
    heartbeats), and the next process to declare it leads; a leader whose connection closed is told so (the
    event ``leadership`` yields is set) and has to take it again like any other. Reads, writes and the stream
    consumer use two robust connections of their own (like RabbitMQStateStore).

    ``now_ms`` is this process's clock: RabbitMQ offers no server time over AMQP. Fire times do not depend on
    it (only on the schedule and its cursor), but a leader whose clock is off fires early or late by as much.
    """

    mode: ClassVar[ScheduleMode] = "leader"
    publish_first: ClassVar[bool] = True

    def __init__(self, channels: _Channels) -> None:
        self._channels = channels
        #: Seconds an operation waits for the broker (a barrier: for the consumer to make progress).
        self.operation_timeout = channels.operation_timeout
        self._fold = _Fold()
        self._name = uuid.uuid4().hex[:12]
        self._serial = itertools.count()
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._connecting = asyncio.Lock()
        self._subscribing = asyncio.Lock()
        self._attaching: asyncio.Future[None] | None = None
        self._channel: AbstractChannel | None = None
        self._underlay: Any = None
        self._tag: str | None = None
        self._offset: int | None = None  # of the last event folded
        self._received = 0
        self._unacked = 0
        self._last_tag: int | None = None
        self._ack_scheduled = False
        self._next_sync: asyncio.Future[None] | None = None
        self._sync_lock = asyncio.Lock()
        self._leading = False
        self._snapshotting: asyncio.Future[None] | None = None
        self._lock_connections: set[AbstractConnection] = set()
        self._closed = False

    def describe(self) -> str:
        """The broker, as ``amqp://host:port/vhost`` (no credentials)."""
        return self._channels.backend

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    # -- the contract ---------------------------------------------------------------------------------

    async def now_ms(self) -> int:
        """This process's clock (ms since the epoch): RabbitMQ has no server clock an AMQP client can read."""
        return math.floor(time.time() * 1000)

    async def upsert(self, spec: ScheduleSpec, now_ms: int) -> ScheduleSpec:
        """See :meth:`ScheduleStore.upsert`: the cursor event is written first, then the put (both confirmed)."""
        await self._sync()
        fold = self._fold
        old = fold.live(spec.name)
        if old is not None and old.same_as(spec):
            return old
        cursor = max(fold.cursors.get(spec.name, now_ms), now_ms)
        version = self._next_version(spec.name)
        await self._publish({"op": "cursor", "name": spec.name, "ms": cursor})
        fold.cursor(spec.name, cursor)
        await self._publish({"op": "put", "name": spec.name, "v": list(version), "spec": spec.model_dump(mode="json")})
        fold.put(spec.name, version, spec)
        self.changed.set()
        return spec

    async def remove(self, name: str) -> bool:
        """See :meth:`ScheduleStore.remove`: a tombstone put, after which ``advance`` of it returns False."""
        await self._sync()
        if self._fold.live(name) is None:
            return False
        version = self._next_version(name)
        await self._publish({"op": "put", "name": name, "v": list(version), "spec": None})
        self._fold.put(name, version, None)
        self.changed.set()
        return True

    async def load(self) -> list[ScheduleState]:
        """See :meth:`ScheduleStore.load`: the fold, once it read every event confirmed before the call."""
        await self._sync()
        fold = self._fold
        return [
            ScheduleState(spec, fold.cursors.get(name)) for name, (_, spec) in fold.specs.items() if spec is not None
        ]

    async def advance(self, spec: ScheduleSpec, expected_ms: int | None, cursor_ms: int) -> bool:
        """See :meth:`ScheduleStore.advance`: compared with this process's fold (the leader writes cursors; an
        upsert elsewhere moves one forward only), then a confirmed cursor event."""
        fold = self._fold
        stored = fold.live(spec.name)
        if stored is None or not stored.same_as(spec) or fold.cursors.get(spec.name) != expected_ms:
            return False
        await self._publish({"op": "cursor", "name": spec.name, "ms": cursor_ms})
        fold.cursor(spec.name, cursor_ms)
        return True

    @contextlib.asynccontextmanager
    async def leadership(self) -> AsyncIterator[asyncio.Event]:
        """Wait until this process holds the lock queue (trying again about every second while another one
        does, and after connection trouble), read the stream up to now, write a snapshot, and yield an event set
        when the lock's connection or channel closes (the lead is lost). The lock is released on exit."""
        backoff = _RETRY_BASE
        while True:
            connection, lost = await self._take_lock()
            try:
                await self._sync()
                await self._write_snapshot()
                break
            except BackendRefusedError:
                await self._drop_lock(connection)
                raise
            except BackendError as exc:
                await self._drop_lock(connection)
                logger.warning(
                    "took the scheduler lock on %s but could not read the schedules: %s", self.describe(), exc
                )
            except BaseException:
                await self._drop_lock(connection)
                raise
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RETRY_CAP)
        logger.info("leading the schedules of %s", self.describe())
        self._leading = True
        try:
            yield lost
        finally:
            self._leading = False
            await self._drop_lock(connection)

    async def close(self) -> None:
        """Stop following the stream, release the lock if held, and close the connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(ClosedError(f"the schedule store {self.describe()} is closed"))
        self._pending.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._channel = self._underlay = self._tag = None
        for connection in list(self._lock_connections):
            await self._drop_lock(connection)
        await self._channels.close()

    # -- leadership -----------------------------------------------------------------------------------

    async def _take_lock(self) -> tuple[AbstractConnection, asyncio.Event]:
        """Declare the lock queue on a connection of its own, waiting while another connection holds it."""
        backoff = _RETRY_BASE
        connection: AbstractConnection | None = None
        while True:
            self._check_open()
            try:
                if connection is None or connection.is_closed:
                    if connection is not None:
                        await self._drop_lock(connection)
                    connection = await self._lock_connection()
                channel = await connection.channel()
                try:
                    await channel.declare_queue(
                        SCHEDULER_LOCK,
                        durable=False,
                        exclusive=True,
                        auto_delete=True,
                        timeout=self.operation_timeout,
                    )
                except ChannelLockedResource:
                    logger.debug("the scheduler lock on %s is held by another process; waiting", self.describe())
                    await asyncio.sleep(_LOCK_RETRY)
                    backoff = _RETRY_BASE
                    continue
                lost = asyncio.Event()
                on_close = functools.partial(_set_on_close, lost)
                connection.close_callbacks.add(on_close)
                channel.close_callbacks.add(on_close)
                if connection.is_closed or channel.is_closed:
                    lost.set()
                return connection, lost
            except asyncio.CancelledError:
                if connection is not None:
                    await asyncio.shield(self._drop_lock(connection))
                raise
            except (*_CONNECTION_ERRORS, BackendUnavailableError) as exc:
                refused = conditions.refusal(exc, self._channels.endpoint)
                if connection is not None:
                    await self._drop_lock(connection)
                    connection = None
                if refused is not None:
                    raise refused from exc
                logger.warning(
                    "could not try the scheduler lock on %s (%s: %s); trying again in %.1fs",
                    self.describe(),
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RETRY_CAP)

    async def _lock_connection(self) -> AbstractConnection:
        """A plain (not robust) connection for the lock: once it closes, its lock is gone for good."""
        channels = self._channels
        endpoint = channels.endpoint
        url = make_url(
            host=endpoint.host,
            port=endpoint.port,
            login=endpoint.username or "",
            password=channels._password.reveal(),
            virtualhost=endpoint.path,
            ssl=endpoint.tls,
            heartbeat=channels.heartbeat,
        )
        connection = await aio_pika.connect(
            url,
            ssl_context=channels._ssl_context,
            timeout=channels.connect_timeout,
            client_properties={"connection_name": f"{channels.name} lock"},
        )
        self._lock_connections.add(connection)
        return connection

    async def _drop_lock(self, connection: AbstractConnection) -> None:
        self._lock_connections.discard(connection)
        if not connection.is_closed:
            with contextlib.suppress(Exception):
                await self._channels.timed(connection.close())

    async def _write_snapshot(self) -> None:
        self._fold.since_snapshot = 0
        await self._publish(self._fold.snapshot())

    def _snapshot_soon(self) -> None:
        if self._leading and not self._closed and (self._snapshotting is None or self._snapshotting.done()):
            self._snapshotting = self._spawn(self._write_snapshot_quietly())

    async def _write_snapshot_quietly(self) -> None:
        try:
            await self._write_snapshot()
        except (BackendError, ClosedError) as exc:
            logger.warning("could not write a snapshot of the schedules on %s: %s", self.describe(), exc)

    # -- connections and the stream consumer ----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"the schedule store {self.describe()} is closed")

    def _spawn(self, coroutine: Awaitable[_T]) -> asyncio.Future[_T]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _following(self) -> None:
        """Connect if needed and have the consumer subscribed (replaying the stream from its first event)."""
        self._check_open()
        if self._channels.connection is None:
            async with self._connecting:
                if self._channels.connection is None:
                    await self._channels.connect()
        attaching = self._attaching
        if attaching is None or (attaching.done() and self._tag is None):
            attaching = self._attaching = self._spawn(self._attach(patient=False))
        await self._progressing(attaching, "following the schedules")
        self._check_open()

    async def _progressing(self, waited: asyncio.Future[_T], what: str) -> _T:
        """``waited``'s result, failing only when the consumer received nothing for ``operation_timeout`` (a
        replay of a long stream takes as long as it takes)."""
        while True:
            received = self._received
            try:
                return await asyncio.wait_for(asyncio.shield(waited), self.operation_timeout)
            except asyncio.TimeoutError:
                if self._received == received:
                    raise self._channels.endpoint.unavailable(
                        f"{what} on {self.describe()}: nothing arrived within {self.operation_timeout:g}s"
                    ) from None

    async def _attach(self, *, patient: bool) -> None:
        """Subscribe the consumer (after the last event folded, if any); retried while the stream refuses
        consumers, until ``operation_timeout`` unless ``patient`` (after a lost channel: until it works)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.operation_timeout
        backoff = _RETRY_BASE
        while self._tag is None and not self._closed:
            try:
                async with self._subscribing:
                    if self._tag is None:
                        await self._consume()
            except (_NotReady, BackendUnavailableError) as exc:
                if not patient and loop.time() >= deadline:
                    if isinstance(exc, BackendUnavailableError):
                        raise
                    raise self._channels.endpoint.unavailable(
                        f"cannot follow the schedules stream {SCHEDULES_STREAM} on {self.describe()}: {exc}"
                    ) from None
                logger.debug("following the schedules stream failed, retrying: %s", exc)
            except (BackendError, ClosedError):
                if not patient or self._closed:
                    raise
            if self._tag is None:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RETRY_CAP)

    async def _declare(self) -> None:
        with self._channels.boundary():
            async with self._channels.ops_channel() as channel:
                try:
                    await channel.declare_queue(
                        SCHEDULES_STREAM, durable=True, arguments=stream_arguments(), timeout=self.operation_timeout
                    )
                except ChannelNotFoundEntity as exc:
                    raise _NotReady(str(exc)) from exc  # "home node ... is down or inaccessible"
                except ChannelPreconditionFailed as exc:  # declared with other bounds elsewhere: use it as is
                    logger.debug("the schedules stream exists with other arguments: %s", exc)

    async def _consume(self) -> None:
        await self._declare()
        with self._channels.boundary():
            channel = await self._channels.open_channel(prefetch=_PREFETCH)
            try:
                underlay = await channel.get_underlay_channel()
                tag = f"mindtrace.schedules.{uuid.uuid4().hex}"
                self._channel, self._underlay, self._tag = channel, underlay, tag
                channel.close_callbacks.add(self._on_channel_closed)
                _on_consumer_cancel(underlay, self._on_consumer_cancelled)
                offset: int | str = "first" if self._offset is None else self._offset + 1
                try:
                    await underlay.basic_consume(
                        SCHEDULES_STREAM,
                        functools.partial(self._deliver, tag),
                        no_ack=False,
                        consumer_tag=tag,
                        arguments={"x-stream-offset": offset},
                        timeout=self.operation_timeout,
                    )
                except ChannelPreconditionFailed as exc:
                    raise _NotReady(str(exc)) from exc
            except BaseException:
                if self._channel is channel:
                    self._channel = self._underlay = self._tag = None
                await self._channels.discard(channel)
                raise

    def _on_channel_closed(self, channel: Any, exc: BaseException | None = None) -> None:
        if channel is not self._channel:
            return
        self._channel = self._underlay = self._tag = None
        if not self._closed:
            logger.info("the schedules stream consumer was lost (%s), following it again", exc)
            self._attaching = self._spawn(self._attach(patient=True))

    def _on_consumer_cancelled(self, frame: spec.Basic.Cancel) -> None:
        if frame.consumer_tag is None or frame.consumer_tag != self._tag:
            return
        channel = self._channel
        self._channel = self._underlay = self._tag = None
        if channel is not None:
            self._spawn(self._channels.discard(channel))
        if not self._closed:
            self._attaching = self._spawn(self._attach(patient=True))

    async def _deliver(self, tag: str, message: DeliveredMessage) -> None:
        # Deliveries run in order; the fold needs no order anyway, nor does it await anything.
        if tag != self._tag:
            return  # a delivery of a consumer given up
        self._received += 1
        headers = message.header.properties.headers or {}
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int) and not isinstance(offset, bool):
            if self._offset is not None and offset <= self._offset:
                return  # already folded (a resumed consumer starts at a chunk boundary)
            self._offset = offset
        self._fold_event(message.body)
        self._last_tag = getattr(message.delivery, "delivery_tag", None)
        self._unacked += 1
        if self._unacked >= _ACK_EVERY:
            self._ack()
        elif not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._ack)

    def _ack(self) -> None:
        """Ack what the consumer was given so far (one ack for many): a stream consumer's credit."""
        self._ack_scheduled = False
        if self._unacked and self._last_tag is not None and self._underlay is not None:
            self._unacked = 0
            self._spawn(self._send_ack(self._underlay, self._last_tag))

    @staticmethod
    async def _send_ack(underlay: Any, delivery_tag: int) -> None:
        with contextlib.suppress(Exception):  # a channel gone took its deliveries with it
            await underlay.basic_ack(delivery_tag, multiple=True)

    # -- the fold -------------------------------------------------------------------------------------

    def _fold_event(self, body: bytes) -> None:
        fold = self._fold
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            op = data.get("op")
            if op == "put":
                if fold.put(str(data["name"]), _version(data["v"]), _spec(data["spec"])):
                    self.changed.set()  # another process's change (this one's own were folded when written)
            elif op == "cursor":
                fold.cursor(str(data["name"]), _ms(data["ms"]))
            elif op == "snapshot":
                self._fold_snapshot(data)
            elif op == "barrier":
                future = self._pending.get(str(data.get("id", "")))
                if future is not None and not future.done():
                    future.set_result(None)
            # Unknown ops come from newer writers.
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            logger.warning("ignoring an unreadable event on %s: %s", SCHEDULES_STREAM, exc)
            return
        if op == "snapshot":
            fold.since_snapshot = 0
        else:
            fold.since_snapshot += 1
            if fold.since_snapshot >= SNAPSHOT_EVERY:
                self._snapshot_soon()

    def _fold_snapshot(self, data: dict[str, Any]) -> None:
        fold = self._fold
        specs, cursors = data["specs"], data["cursors"]
        if not isinstance(specs, dict) or not isinstance(cursors, dict):
            raise ValueError("a snapshot's specs and cursors are objects")
        changed = False
        for name, (version, stored) in specs.items():
            changed = fold.put(str(name), _version(version), _spec(stored)) or changed
        for name, ms in cursors.items():
            fold.cursor(str(name), _ms(ms))
        if changed:
            self.changed.set()

    def _next_version(self, name: str) -> Version:
        """A version newer than every put of ``name`` folded so far, from this process's clock."""
        now = math.floor(time.time() * 1000)
        last = self._fold.version(name)
        return (now if last is None else max(now, last[0] + 1)), uuid.uuid4().hex

    # -- publishing -----------------------------------------------------------------------------------

    async def _publish(self, event: dict[str, Any]) -> None:
        """Publish ``event`` to the stream, confirmed (the stream declared again if it was deleted)."""
        await self._following()
        body = json.dumps(event, separators=(",", ":")).encode()
        try:
            await self._send(body)
        except _StreamGone:
            await self._declare()
            try:
                await self._send(body)
            except _StreamGone:
                raise self._channels.endpoint.unavailable(
                    f"the schedules stream {SCHEDULES_STREAM} on {self.describe()} takes no events"
                ) from None

    async def _send(self, body: bytes) -> None:
        """One persistent, mandatory, confirmed publish; sent once more on a fresh channel if nothing was sent."""
        properties = spec.Basic.Properties(delivery_mode=2, content_type="application/json")
        for attempt in (1, 2):
            with self._channels.boundary():
                channel = await self._channels.confirm_channel()
                underlay = await channel.get_underlay_channel()
                try:
                    confirmation = await underlay.basic_publish(
                        body,
                        exchange="",
                        routing_key=SCHEDULES_STREAM,
                        properties=properties,
                        mandatory=True,
                        timeout=self.operation_timeout,
                    )
                except aiormq.exceptions.PublishError as exc:
                    if getattr(exc.frame, "reply_code", None) == _NO_ROUTE:
                        raise _StreamGone(SCHEDULES_STREAM) from exc
                    raise
                except ChannelInvalidStateError:
                    if attempt == 2:
                        raise
                    continue
                if isinstance(confirmation, spec.Basic.Nack):
                    raise self._channels.endpoint.unavailable(
                        f"{self.describe()} refused (nacked) an event for {SCHEDULES_STREAM}"
                    )
                return

    async def _sync(self) -> None:
        """Return once the fold read every event confirmed before the call (one barrier serves every caller
        that arrived before it was sent)."""
        await self._following()
        waiter = self._next_sync
        if waiter is None:
            waiter = self._next_sync = asyncio.get_running_loop().create_future()
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._spawn(self._send_barrier(waiter))
        await self._progressing(waiter, "reading the schedules")

    async def _send_barrier(self, waiter: asyncio.Future[None]) -> None:
        async with self._sync_lock:
            if self._next_sync is waiter:
                self._next_sync = None  # callers from now on wait for the next barrier
            key = f"{self._name}-{next(self._serial)}"
            folded = self._pending[key] = asyncio.get_running_loop().create_future()
            try:
                await self._publish({"op": "barrier", "id": key})
                await self._progressing(folded, "reading the schedules")
            except BaseException as exc:
                if not waiter.done():
                    if self._closed:
                        waiter.set_exception(ClosedError(f"the schedule store {self.describe()} is closed"))
                    elif isinstance(exc, asyncio.CancelledError):
                        waiter.cancel()
                    else:
                        waiter.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            finally:
                self._pending.pop(key, None)
            if not waiter.done():
                waiter.set_result(None)
