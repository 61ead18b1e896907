"""RabbitMQScheduleStore: schedules as events on one RabbitMQ stream, fired by the holder of an exclusive queue."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final

import aio_pika
from aio_pika.abc import AbstractConnection
from aio_pika.connection import make_url
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import ChannelInvalidStateError, ChannelLockedResource
from pydantic import ValidationError

from mindtrace.jobs.backends.base import ScheduleMode
from mindtrace.jobs.backends.rabbitmq import conditions
from mindtrace.jobs.backends.rabbitmq.streams import StreamFollower
from mindtrace.jobs.backends.rabbitmq.topology import EXCHANGE
from mindtrace.jobs.errors import BackendError, BackendRefusedError, BackendUnavailableError, ClosedError
from mindtrace.jobs.schedules import ScheduleSpec, ScheduleState, ScheduleStore

if TYPE_CHECKING:
    from mindtrace.jobs.backends.rabbitmq.connection import _Channels

logger = logging.getLogger("mindtrace.jobs")

#: The default schedules namespace: the stream and the lock queue are ``<namespace>:schedules`` and
#: ``<namespace>:scheduler.lock``.
SCHEDULES_NAMESPACE: Final = EXCHANGE

#: The durable stream queue holding every schedule event of the namespace (puts, tombstones, cursors, snapshots).
SCHEDULES_STREAM: Final = f"{SCHEDULES_NAMESPACE}:schedules"

#: The exclusive, auto-delete queue whose holder (one connection at a time) alone fires the namespace's schedules.
SCHEDULER_LOCK: Final = f"{SCHEDULES_NAMESPACE}:scheduler.lock"

#: The stream keeps about this many bytes (whole segments are dropped, oldest first).
STREAM_MAX_BYTES: Final = 20_000_000

#: Size of one stream segment: the unit the broker drops when the stream is over ``STREAM_MAX_BYTES``.
STREAM_SEGMENT_BYTES: Final = 1_000_000

#: The leader writes a snapshot of the whole fold after this many events (of any process) since the last one,
#: so that the segments the stream drops only ever hold events a later snapshot repeats.
SNAPSHOT_EVERY: Final = 500

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
    """Schedules on RabbitMQ alone: every change is an event on the stream ``<namespace>:schedules``
    (``mindtrace.jobs:schedules`` by default), which each process folds; the process that holds the exclusive
    queue ``<namespace>:scheduler.lock`` fires. Clients with another ``namespace`` on the same vhost keep
    schedules of their own, fired by their own leader.

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

    def __init__(self, channels: _Channels, namespace: str = SCHEDULES_NAMESPACE) -> None:
        self._channels = channels
        #: The stream of this store's schedules, and the queue whose holder fires them (see ``namespace``).
        self.stream, self.lock = f"{namespace}:schedules", f"{namespace}:scheduler.lock"
        #: Seconds an operation waits for the broker (a barrier: for the consumer to make progress).
        self.operation_timeout = channels.operation_timeout
        self._fold = _Fold()
        self._connecting = asyncio.Lock()
        self._follower = StreamFollower(
            channels,
            self.stream,
            fold=self._fold_event,
            arguments=stream_arguments,
            barrier=lambda key: {"op": "barrier", "id": key},
            label="schedules stream",
            owner="the schedule store",
            tag_prefix="mindtrace.schedules.",
            reading="reading the schedules",
            publish_barrier=self._publish_body,
            retry_cap=_RETRY_CAP,
        )
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
        self._follower.close()
        await self._follower.wait_closed()
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
                        self.lock,
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
            self._snapshotting = self._follower.spawn(self._write_snapshot_quietly())

    async def _write_snapshot_quietly(self) -> None:
        try:
            await self._write_snapshot()
        except (BackendError, ClosedError) as exc:
            logger.warning("could not write a snapshot of the schedules on %s: %s", self.describe(), exc)

    # -- connections and the stream consumer ----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"the schedule store {self.describe()} is closed")

    async def _following(self) -> None:
        """Connect if needed and have the consumer subscribed (replaying the stream from its first event)."""
        self._check_open()
        if self._channels.connection is None:
            async with self._connecting:
                if self._channels.connection is None:
                    await self._channels.connect()
        await self._follower.following(passive=False, what="following the schedules")
        self._check_open()

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
                self._follower.resolve(str(data.get("id", "")))
            # Unknown ops come from newer writers.
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            logger.warning("ignoring an unreadable event on %s: %s", self.stream, exc)
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
        await self._publish_body(json.dumps(event, separators=(",", ":")).encode())

    async def _publish_body(self, body: bytes) -> None:
        await self._following()
        await self._follower.publish(body, content_type="application/json")

    async def _sync(self) -> None:
        """Return once the fold read every event confirmed before the call (one barrier serves every caller
        that arrived before it was sent)."""
        await self._following()
        await self._follower.sync("reading the schedules")
