"""RedisStateStore: job records as Redis hashes under each queue's hash tag, written by Lua, woken by pub/sub."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from mindtrace.jobs.backends.redis.connection import _RETRY_BASE, _RETRY_CAP, RedisConnection
from mindtrace.jobs.constants import DLQ_SUFFIX, OPERATION_TIMEOUT, REDIS_KEY_PREFIX, RESULT_TTL
from mindtrace.jobs.errors import BackendError, ClosedError
from mindtrace.jobs.lifecycle import CancelOutcome, JobInfo, JobStatus, StateUpdate
from mindtrace.jobs.state.base import CancelCallback, CancelListener, StateCapabilities, StateStore, Watch, changed

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from mindtrace.jobs.backends.base import Backend
    from mindtrace.jobs.backends.redis import RedisClient

logger = logging.getLogger("mindtrace.jobs")

#: Job ids per call of the forgetting script (purges and queue deletions), to bound the time it holds Redis.
_FORGET_CHUNK = 500

_Handler = Callable[[bytes], None]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def fold(queue: str, job_id: str, raw: dict[Any, Any]) -> JobInfo:
    """The record a hash written by ``state_record.lua`` holds: its updates folded by ``JobInfo.apply``."""
    info = JobInfo(job_id=job_id, queue=queue)
    fields = {_text(k): v for k, v in raw.items()}
    entries = sorted((int(name[1:]), value) for name, value in fields.items() if name[:1] == "e" and name[1:].isdigit())
    for _, value in entries:
        info = info.apply(StateUpdate.from_fields(json.loads(value)))
    progress = fields.get("p")
    if progress is not None:
        info = info.apply(StateUpdate.from_fields(json.loads(progress)))
    return info


class _Subscriber:
    """The one pub/sub connection of a store, shared by its watches and cancel listeners.

    ``subscribe`` returns once the server confirmed the subscription (so a read after it cannot miss a change).
    A lost connection is opened again with backoff, every channel subscribed again, and then ``on_resync`` is
    called so that followers read again what they follow. Idle, it sends nothing.
    """

    def __init__(self, connection: RedisConnection, hello: str, on_resync: Callable[[], None]) -> None:
        self._connection = connection
        self._hello = hello  # always subscribed, so the connection never has nothing to read
        self._on_resync = on_resync
        self._handlers: dict[str, set[_Handler]] = {}
        self._confirmations: dict[str, list[asyncio.Future[None]]] = {}
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._resync_left = 0
        self._opened_before = False
        self._closed = False
        # Orders SUBSCRIBE and UNSUBSCRIBE of one channel as they were asked for: an UNSUBSCRIBE sent after a
        # new SUBSCRIBE of the channel would leave its new follower deaf.
        self._commands = asyncio.Lock()

    async def subscribe(self, channel: str, handler: _Handler) -> None:
        """Call ``handler(data)`` for each message on ``channel``; returns once the subscription is in place."""
        if self._closed:
            raise ClosedError("the state store is closed")
        handlers = self._handlers.setdefault(channel, set())
        first = not handlers
        handlers.add(handler)
        pending = self._confirmations.get(channel)
        if not first and not pending:
            return  # already in place
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(channel, []).append(future)
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        elif first and self._pubsub is not None:
            try:
                async with self._commands:
                    await self._pubsub.subscribe(channel)
            except (RedisError, OSError) as exc:  # the reader reconnects and subscribes it then
                logger.debug("subscribe to %s failed (resubscribed on reconnect): %s", channel, exc)
        try:
            await future
        except BaseException:
            self.unsubscribe(channel, handler)
            raise

    def unsubscribe(self, channel: str, handler: _Handler) -> None:
        """Stop calling ``handler`` for ``channel`` (the channel is left once nothing follows it)."""
        handlers = self._handlers.get(channel)
        if handlers is None:
            return
        handlers.discard(handler)
        if handlers:
            return
        del self._handlers[channel]
        if self._pubsub is not None and not self._closed:
            task = asyncio.ensure_future(self._leave(self._pubsub, channel))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _leave(self, pubsub: Any, channel: str) -> None:
        async with self._commands:
            if channel in self._handlers or pubsub is not self._pubsub:
                return  # followed again meanwhile, or the connection is gone with its subscriptions
            with contextlib.suppress(RedisError, OSError):
                await pubsub.unsubscribe(channel)

    async def _open(self) -> None:
        client = self._connection.subscriber()
        pubsub: Any = client.pubsub()
        channels = [self._hello, *self._handlers]
        self._resync_left = len(channels)
        try:
            await pubsub.subscribe(*channels)
        except BaseException:
            await pubsub.aclose()
            await client.aclose()
            raise
        self._client, self._pubsub = client, pubsub
        late = [channel for channel in self._handlers if channel not in channels]  # asked for while opening
        if late:
            self._resync_left += len(late)
            await pubsub.subscribe(*late)

    async def _drop(self) -> None:
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = None
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def _read(self) -> None:
        backoff = _RETRY_BASE
        while not self._closed:
            try:
                if self._pubsub is None:
                    await self._open()
                message = await self._pubsub.get_message(timeout=None)
            except (RedisError, OSError, ConnectionError) as exc:
                if self._pubsub is not None or backoff == _RETRY_BASE:
                    logger.warning(
                        "state store subscription to %s lost, reconnecting: %s", self._connection.backend, exc
                    )
                await self._drop()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RETRY_CAP)
                continue
            backoff = _RETRY_BASE
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = _text(message.get("type", b""))
        channel = _text(message.get("channel") or b"")
        if kind == "message":
            for handler in list(self._handlers.get(channel, ())):
                handler(message["data"])
        elif kind == "subscribe":
            for future in self._confirmations.pop(channel, ()):
                if not future.done():
                    future.set_result(None)
            if self._resync_left:
                self._resync_left -= 1
                if not self._resync_left:
                    if self._opened_before:
                        self._on_resync()
                    self._opened_before = True

    async def close(self) -> None:
        """Close the connection; pending subscriptions fail with ClosedError."""
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        await self._drop()
        for futures in self._confirmations.values():
            for future in futures:
                if not future.done():
                    future.set_exception(ClosedError("the state store is closed"))
        self._confirmations.clear()


class _RedisWatch(Watch):
    def __init__(self, store: RedisStateStore, queue: str, job_id: str) -> None:
        self._store = store
        self._queue = queue
        self._job_id = job_id
        self._channel = store._event_channel(queue, job_id)
        self._changed = asyncio.Event()
        self._first = True
        self._closed = False

    def _wake(self, _: bytes) -> None:
        self._changed.set()

    async def next(self, deadline: float | None) -> JobInfo | None:
        loop = asyncio.get_running_loop()
        if self._first:
            await self._store._ensure_connected()
            self._store._watches.add(self)
            subscribing = self._store._subscriber.subscribe(self._channel, self._wake)
            try:
                # Even a wait with no time left reads once, so a job finished before it returns at once.
                limit = None if deadline is None else max(OPERATION_TIMEOUT, deadline - loop.time())
                await asyncio.wait_for(subscribing, limit)
            except asyncio.TimeoutError:
                return None
            self._first = False
            return await self._read(deadline)
        if not await changed(self._changed, deadline):
            return None
        return await self._read(deadline)

    async def _read(self, deadline: float | None) -> JobInfo | None:
        """The record now; while the store cannot be reached, read again on its reconnect (or after a backoff)."""
        loop = asyncio.get_running_loop()
        backoff = _RETRY_BASE
        while True:
            try:
                return await self._store.info(self._queue, self._job_id)
            except ClosedError:
                raise
            except BackendError as exc:
                if deadline is not None and loop.time() >= deadline:
                    raise
                logger.debug("reading the record of %s failed, reading again: %s", self._job_id, exc)
            timeout = backoff if deadline is None else max(0.0, min(backoff, deadline - loop.time()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
            self._changed.clear()
            backoff = min(backoff * 2, _RETRY_CAP)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._store._watches.discard(self)
            self._store._subscriber.unsubscribe(self._channel, self._wake)


class _RedisListener(CancelListener):
    def __init__(self, store: RedisStateStore, queue: str, callback: CancelCallback) -> None:
        self._store = store
        self._queue = queue
        self._callback = callback
        self._channel = store._cancel_channel(queue)
        self._last = "0-0"  # the cancel stream's last entry seen
        self._catching_up: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._store._subscriber.subscribe(self._channel, self._heard)
        commands: Any = self._store._connection.commands
        with self._store._connection.io():
            last = await commands.xrevrange(self._store._cancel_stream(self._queue), count=1)
        if last:
            self._last = max(self._last, _text(last[0][0]), key=_stream_order)
        self._store._listeners.add(self)

    def _heard(self, data: bytes) -> None:
        sid, job_id, reason = _text(data).split("\n", 2)
        self._deliver(sid, job_id, reason)

    def _deliver(self, sid: str, job_id: str, reason: str) -> None:
        if _stream_order(sid) > _stream_order(self._last):
            self._last = sid
        self._callback(job_id, reason or None)

    def resync(self) -> None:
        """After a reconnect: deliver the cancels the stream holds past the last one seen."""
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.ensure_future(self._catch_up())

    async def _catch_up(self) -> None:
        commands: Any = self._store._connection.commands
        try:
            with self._store._connection.io():
                entries = await commands.xrange(self._store._cancel_stream(self._queue), min=f"({self._last}", max="+")
        except BackendError as exc:
            logger.warning("could not catch up on cancels of %r after a reconnect: %s", self._queue, exc)
            return
        for sid, fields in entries:
            values = {_text(k): _text(v) for k, v in fields.items()}
            self._deliver(_text(sid), values.get("id", ""), values.get("reason", ""))

    async def close(self) -> None:
        self._store._listeners.discard(self)
        self._store._subscriber.unsubscribe(self._channel, self._heard)
        if self._catching_up is not None:
            self._catching_up.cancel()


def _stream_order(sid: str) -> tuple[int, int]:
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq or 0)


class RedisStateStore(StateStore):
    """Job records in Redis, for any broker (the default of a RedisClient; give a ``redis://`` URL as the
    ``state`` of an orchestrator over RabbitMQ).

    One hash per job under its queue's hash tag, changed only by Lua that applies the merge rule's effects
    (``record()`` in ``lib.lua``): a read folds the hash's updates with ``JobInfo.apply``, so the rule has one
    implementation. A terminal record expires by the server after its retention. Watchers subscribe to the
    job's channel on one shared pub/sub connection, then read; they wake on a message and read again after a
    reconnect. A cancel is one script that checks the record and, for a job not running, makes it CANCELLED
    in the same step; a consumer records RUNNING and reads the cancel flag in one script, so a cancelled queued
    job never starts (``exact_cancel``). The store of a RedisClient (``client.state_store()``) is written by
    that client's own publish and settle scripts, in the same step (``atomic_settles``); a store built by
    :meth:`from_url` for another broker is written just before that broker is told (a crash in between re-runs
    the job, and its first terminal record wins). Build it with :meth:`from_url`, which takes RedisClient's
    URL and options.
    """

    def __init__(
        self,
        connection: RedisConnection,
        *,
        key_prefix: str = REDIS_KEY_PREFIX,
        cancelled_ttl: float = RESULT_TTL,
        owner: RedisClient | None = None,
    ) -> None:
        self._connection = connection
        #: The RedisClient whose publishes and settles write these records in the same script (its own store).
        self._owner = owner
        self.capabilities = StateCapabilities(
            exact_cancel=True,
            cancel_race=0.0,
            direct_lookup=True,
            atomic_settles=owner is not None,
            survives_restart=True,
        )
        self.key_prefix = key_prefix
        #: How long the record of a job cancelled before it ran is kept (seconds).
        self.cancelled_ttl = cancelled_ttl
        self._connecting = asyncio.Lock()
        self._subscriber = _Subscriber(connection, f"{key_prefix}state:hello", self._resync)
        self._watches: set[_RedisWatch] = set()
        self._listeners: set[_RedisListener] = set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisStateStore:
        """A store for a ``redis://`` or ``rediss://`` URL, with the URL forms and options of
        :meth:`RedisClient.from_url <mindtrace.jobs.RedisClient.from_url>` (``key_prefix`` included)."""
        from mindtrace.jobs.backends.redis import RedisClient

        client = RedisClient.from_url(url, **kwargs)
        return cls(client.new_connection(), key_prefix=client.key_prefix)

    def describe(self) -> str:
        return self._connection.backend

    def settles_with(self, backend: Backend) -> bool:
        return backend is self._owner

    # -- keys ---------------------------------------------------------------------------------------

    def _base(self, queue: str) -> str:
        stem = queue[: -len(DLQ_SUFFIX)] if queue.endswith(DLQ_SUFFIX) else queue
        return f"{self.key_prefix}{{{stem}}}{queue[len(stem) :]}:"

    def record_key(self, queue: str, job_id: str) -> str:
        """The hash of the record of ``job_id`` on ``queue`` (under the queue's hash tag)."""
        return f"{self._base(queue)}job:{job_id}"

    def index_key(self, queue: str) -> str:
        """The sorted set indexing the records of ``queue`` (job id -> expiry ms; +inf while not terminal)."""
        return f"{self._base(queue)}jobs"

    def forget_prefixes(self, queue: str) -> tuple[str, str]:
        """The prefixes of ``queue``'s record keys and event channels (a job id completes each)."""
        return f"{self._base(queue)}job:", f"{self._base(queue)}event:"

    def unique_key(self, queue: str, key: str) -> str:
        """The string naming the job that holds the unique key ``key`` on ``queue`` (under the queue's hash tag)."""
        return f"{self._base(queue)}unique:{key}"

    def unique_args(self, queue: str, update: StateUpdate) -> list[str]:
        """The three arguments of a publish script taking ``update``'s unique key (lib.lua), "" for none."""
        if update.dedup_key is None:
            return ["", "", ""]
        ttl = "" if update.dedup_ttl is None else str(max(1, math.ceil(update.dedup_ttl * 1000)))
        return [self.unique_key(queue, update.dedup_key), ttl, self.forget_prefixes(queue)[0]]

    def _cancel_stream(self, queue: str) -> str:
        return f"{self._base(queue)}cancels"

    def _event_channel(self, queue: str, job_id: str) -> str:
        return f"{self._base(queue)}event:{job_id}"

    def _cancel_channel(self, queue: str) -> str:
        return f"{self._base(queue)}cancel"

    # -- connections --------------------------------------------------------------------------------

    async def _ensure_connected(self) -> None:
        if self._closed:
            raise ClosedError(f"the state store {self.describe()} is closed")
        if not self._connection.connected:
            async with self._connecting:
                if not self._connection.connected:
                    await self._connection.connect()

    async def connect(self) -> None:
        await self._ensure_connected()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for listener in list(self._listeners):
            await listener.close()
        await self._subscriber.close()
        for watch in list(self._watches):
            watch._changed.set()  # their next read says the store is closed
        await asyncio.gather(*self._connection.tasks(), return_exceptions=True)
        await self._connection.close()

    def _resync(self) -> None:
        for watch in list(self._watches):
            watch._changed.set()
        for listener in list(self._listeners):
            listener.resync()

    # -- writes -------------------------------------------------------------------------------------

    def record_args(self, queue: str, update: StateUpdate) -> list[str]:
        """The three arguments of a script writing ``update`` (state_record.lua; the owner's scripts too)."""
        terminal = "1" if update.kind == "status" and update.status.terminal else "0"
        ttl = "" if update.ttl is None else str(max(1, math.ceil(update.ttl * 1000)))
        not_after = "" if update.not_after is None else str(int(update.not_after * 1000))
        meta = f"{update.kind}|{update.status.value}|{terminal}|{ttl}|{int(update.at * 1000)}|{update.attempts}|"
        meta += f"{not_after}|"
        return [
            json.dumps(update.to_fields(), separators=(",", ":")),
            meta + update.job_id,
            self._event_channel(queue, update.job_id),
        ]

    def record_keys(self, queue: str, update: StateUpdate) -> list[str]:
        """The record hash and the index a script writing ``update`` takes (the owner's settle scripts too)."""
        return [self.record_key(queue, update.job_id), self.index_key(queue)]

    async def record(self, queue: str, update: StateUpdate) -> None:
        await self._ensure_connected()
        await self._connection.run("state_record", self.record_keys(queue, update), self.record_args(queue, update))

    async def record_unique(self, queue: str, update: StateUpdate) -> str:
        await self._ensure_connected()
        args = [*self.record_args(queue, update), *self.unique_args(queue, update), update.job_id]
        holder = _text(await self._connection.run("state_unique", self.record_keys(queue, update), args))
        return holder or update.job_id

    async def started(self, queue: str, update: StateUpdate) -> str | None:
        await self._ensure_connected()
        reason = await self._connection.run(
            "state_start", self.record_keys(queue, update), self.record_args(queue, update)
        )
        return None if reason is None else _text(reason)

    async def _forget(self, queue: str, before: float | None, terminal_too: bool) -> None:
        await self._ensure_connected()
        index = self.index_key(queue)
        with self._connection.io():
            members = [
                _text(member)
                async for member, score in self._connection.commands.zscan_iter(index, count=1000)
                if terminal_too or math.isinf(score)
            ]
        prefix, channels = self.forget_prefixes(queue)
        limit = "" if before is None else str(int(before * 1000))
        for start in range(0, len(members), _FORGET_CHUNK):
            chunk = members[start : start + _FORGET_CHUNK]
            await self._connection.run("state_forget", [index], [limit, prefix, channels, *chunk])

    async def purged(self, queue: str, at: float) -> None:
        await self._forget(queue, at, terminal_too=False)

    async def forget_queue(self, queue: str) -> None:
        await self._forget(queue, None, terminal_too=True)
        with self._connection.io():
            await self._connection.commands.delete(self.index_key(queue), self._cancel_stream(queue))

    # -- reads --------------------------------------------------------------------------------------

    async def info(self, queue: str, job_id: str) -> JobInfo:
        await self._ensure_connected()
        return fold(queue, job_id, await self._read(queue, job_id))

    async def _read(self, queue: str, job_id: str) -> dict[str, Any]:
        """The record's hash, read by a script so that concurrent reads share one pipelined round trip."""
        await self._ensure_connected()
        flat = await self._connection.run("state_read", [self.record_key(queue, job_id)], [])
        return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}

    def watch(self, queue: str, job_id: str) -> Watch:
        return _RedisWatch(self, queue, job_id)

    # -- cancellation -------------------------------------------------------------------------------

    async def cancel(self, queue: str, job_id: str, reason: str | None = None) -> CancelOutcome:
        await self._ensure_connected()
        at = time.time()
        cancelled = StateUpdate(job_id, JobStatus.CANCELLED, at, reason=reason, ttl=self.cancelled_ttl)
        request = StateUpdate(job_id, JobStatus.RUNNING, at, reason=reason, kind="cancel")
        keys = [self.record_key(queue, job_id), self.index_key(queue), self._cancel_stream(queue)]
        args = [
            json.dumps(cancelled.to_fields(), separators=(",", ":")),
            json.dumps(request.to_fields(), separators=(",", ":")),
            str(max(1, math.ceil(self.cancelled_ttl * 1000))),
            str(int(at * 1000)),
            job_id,
            reason or "",
            self._event_channel(queue, job_id),
            self._cancel_channel(queue),
        ]
        answer = await self._connection.run("state_cancel", keys, args)
        return CancelOutcome(_text(answer))

    async def cancel_requested(self, queue: str, job_id: str) -> str | None:
        record = await self._read(queue, job_id)
        if "c" in record or _text(record.get("s", b"")) == "cancelled":
            return _text(record.get("r", b""))
        return None

    async def listen_cancels(self, queue: str, callback: CancelCallback) -> CancelListener:
        await self._ensure_connected()
        listener = _RedisListener(self, queue, callback)
        await listener.start()
        return listener
