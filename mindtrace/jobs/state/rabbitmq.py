"""RabbitMQStateStore: job records as events on one RabbitMQ stream per queue, folded in every process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import json
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq import spec
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError, ChannelNotFoundEntity, ChannelPreconditionFailed

from mindtrace.jobs.backends.rabbitmq.compat import _on_consumer_cancel
from mindtrace.jobs.backends.rabbitmq.topology import records_stream_arguments, records_stream_name
from mindtrace.jobs.constants import AMQP_RECORDS_MAX_AGE, RESULT_TTL
from mindtrace.jobs.errors import BackendError, BackendUnavailableError, ClosedError
from mindtrace.jobs.lifecycle import CancelOutcome, JobInfo, JobStatus, StateUpdate
from mindtrace.jobs.state.base import CancelCallback, CancelListener, StateCapabilities, StateStore, Watch, changed

if TYPE_CHECKING:
    from mindtrace.jobs.backends.rabbitmq.connection import _Channels

logger = logging.getLogger("mindtrace.jobs")

_T = TypeVar("_T")

#: Stream messages the broker may push to one store's consumer of a queue before it acks (stream credit).
_PREFETCH: Final = 1000

#: Acks are sent for several messages at once (``multiple``): at the end of a burst, or after this many.
_ACK_EVERY: Final = 250

# AMQP reply code of a mandatory message that no queue was bound to receive (the stream was deleted).
_NO_ROUTE: Final = 312

_RETRY_BASE, _RETRY_CAP = 0.1, 2.0


class _StreamGone(Exception):
    """The queue's stream was deleted under a publish (``forget_queue`` of another process)."""


class _NotReady(Exception):
    """The broker refused to consume the stream for now (just declared: "does not have a replica on the local
    node" until its member has started)."""


@dataclass(eq=False)
class _Log:
    """One queue's stream as this store follows it: the consumer, and the records its events folded to."""

    queue: str
    stream: str
    records: dict[str, JobInfo] = field(default_factory=dict)
    #: Unique jobs' keys: the job last published with each (it holds the key while ``holds_key``).
    keys: dict[str, str] = field(default_factory=dict)
    expiry: list[tuple[float, str]] = field(default_factory=list)
    watches: dict[str, set[asyncio.Event]] = field(default_factory=dict)
    listeners: set[CancelCallback] = field(default_factory=set)
    channel: AbstractChannel | None = None
    underlay: Any = None
    tag: str | None = None
    offset: int | None = None  # of the last event folded
    received: int = 0  # events delivered so far (how a wait tells a slow replay from a dead consumer)
    attaching: asyncio.Future[None] | None = None
    next_sync: asyncio.Future[None] | None = None
    sync_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    subscribing: asyncio.Lock = field(default_factory=asyncio.Lock)  # one consumer at a time, never two
    unacked: int = 0
    last_tag: int | None = None
    ack_scheduled: bool = False

    def read(self, job_id: str, now: float) -> JobInfo:
        info = self.records.get(job_id)
        if info is None or info.expired(now):
            return JobInfo(job_id=job_id, queue=self.queue)
        return info

    def wake(self, job_id: str) -> None:
        for event in self.watches.get(job_id, ()):
            event.set()

    def wake_all(self) -> None:
        for events in self.watches.values():
            for event in events:
                event.set()


class _RabbitMQWatch(Watch):
    def __init__(self, store: RabbitMQStateStore, queue: str, job_id: str) -> None:
        self._store = store
        self._queue = queue
        self._job_id = job_id
        self._changed = asyncio.Event()
        self._log: _Log | None = None
        self._closed = False

    async def next(self, deadline: float | None) -> JobInfo | None:
        store = self._store
        if self._log is None:
            loop = asyncio.get_running_loop()
            backoff = _RETRY_BASE
            while True:
                # Even a wait with no time left reads once, so a job finished before it returns at once.
                limit = None if deadline is None else max(store.operation_timeout, deadline - loop.time())
                try:
                    # Followed first (the fold wakes this watch from now on), then read after a barrier.
                    log = store._log_of(self._queue)
                    log.watches.setdefault(self._job_id, set()).add(self._changed)
                    self._log = log
                    if await asyncio.wait_for(store._following(self._queue, create=False), limit) is not None:
                        await asyncio.wait_for(store._sync(log), limit)
                    break
                except asyncio.TimeoutError:
                    return None
                except ClosedError:
                    raise
                except BackendError as exc:
                    if deadline is not None and loop.time() >= deadline:
                        raise
                    logger.debug("first read of the record of %s failed, reading again: %s", self._job_id, exc)
                await asyncio.sleep(backoff if deadline is None else max(0.0, min(backoff, deadline - loop.time())))
                backoff = min(backoff * 2, _RETRY_CAP)
            return store._read(log, self._job_id)
        if not await changed(self._changed, deadline):
            return None
        return store._read(self._log, self._job_id)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._log is not None:
                events = self._log.watches.get(self._job_id)
                if events is not None:
                    events.discard(self._changed)
                    if not events:
                        del self._log.watches[self._job_id]


class _RabbitMQListener(CancelListener):
    def __init__(self, log: _Log, callback: CancelCallback) -> None:
        self._log = log
        self._callback = callback
        log.listeners.add(callback)

    async def close(self) -> None:
        self._log.listeners.discard(self._callback)


class RabbitMQStateStore(StateStore):
    """Job records on RabbitMQ alone (the default of a RabbitMQClient): one stream queue per queue,
    ``<queue>:records``, holds every record update, cancel and purge of its jobs as an event.

    Writes are published to the stream with publisher confirms, and return once this store's own consumer of
    the stream has seen them. Each store runs one stream consumer per queue it touches (on a connection of its
    own; a second one publishes) and folds the events in stream order by ``JobInfo.apply`` into a dict of
    records, waking the watches of a job from that fold: waiting sends nothing to the broker, and any number
    of watches share the two connections. A queue's first use replays its stream (``direct_lookup`` is False:
    the cost grows with the events kept, see the README); every look-up (``info``, a watch's first read)
    then publishes a barrier event and reads once its own consumer reached it, so it sees every write
    confirmed before it. After a lost connection the consumer resumes at the event after the last one it
    folded and wakes every watch.

    A cancel is an event too; every process folds it at the same place in the stream, so all agree on its
    outcome: a job not yet running becomes CANCELLED there, a running one gets a cancel request that the
    listeners of the queue hear. The consumer writes RUNNING (waiting for its own fold) before it asks
    ``cancel_requested``, so a cancel that comes before RUNNING in the stream is in the record it reads, and
    one after it is heard by its listener: a cancelled job never starts (``exact_cancel``), although its
    message stays in the broker's queue until a consumer takes it and settles it unrun. A terminal record
    expires by its own time plus its ``ttl``; the stream drops whole segments older than ``max_age`` (default
    one day), which also bounds what a process that starts later can know. ``forget_queue`` deletes the
    stream. Build it with :meth:`from_url`, which takes RabbitMQClient's URL and options.
    """

    capabilities = StateCapabilities(
        exact_cancel=True,
        cancel_race=0.0,
        direct_lookup=False,
        atomic_settles=False,
        survives_restart=True,
        # A stream has no insert-if-absent: a unique publish reads the fold, then appends its record.
        dedup="best_effort",
    )

    def __init__(
        self,
        channels: _Channels,
        *,
        cancelled_ttl: float = RESULT_TTL,
        max_age: float = AMQP_RECORDS_MAX_AGE,
    ) -> None:
        self._channels = channels
        #: How long the record of a job cancelled before it ran is kept (seconds).
        self.cancelled_ttl = cancelled_ttl
        #: Seconds each queue's stream keeps its events (its ``x-max-age``).
        self.max_age = max_age
        self.operation_timeout = channels.operation_timeout
        self._logs: dict[str, _Log] = {}
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._name = uuid.uuid4().hex[:12]
        self._serial = itertools.count()
        self._connecting = asyncio.Lock()
        self._closed = False

    @classmethod
    def from_url(
        cls, url: str, *, max_age: float = AMQP_RECORDS_MAX_AGE, cancelled_ttl: float = RESULT_TTL, **kwargs: Any
    ) -> RabbitMQStateStore:
        """A store for an ``amqp://`` or ``amqps://`` URL, with the URL forms and options of
        :meth:`RabbitMQClient.from_url <mindtrace.jobs.RabbitMQClient.from_url>`; give it to an orchestrator
        as ``state=``. ``max_age``: seconds the streams it declares keep their events (a stream that exists
        keeps the arguments it was declared with); ``cancelled_ttl``: retention of a job cancelled unrun."""
        from mindtrace.jobs.backends.rabbitmq import RabbitMQClient

        store = RabbitMQClient.from_url(url, **kwargs).state_store()
        store.max_age, store.cancelled_ttl = max_age, cancelled_ttl
        return store

    def describe(self) -> str:
        return self._channels.backend

    # -- connections --------------------------------------------------------------------------------

    async def _ensure_connected(self) -> None:
        if self._closed:
            raise ClosedError(f"the state store {self.describe()} is closed")
        if self._channels.connection is None:
            async with self._connecting:
                if self._channels.connection is None:
                    await self._channels.connect()

    async def connect(self) -> None:
        await self._ensure_connected()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(ClosedError(f"the state store {self.describe()} is closed"))
        self._pending.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for log in self._logs.values():
            log.channel = log.underlay = log.tag = None
            log.listeners.clear()
            log.wake_all()  # their next read says the store is closed
        await self._channels.close()

    def _spawn(self, coroutine: Awaitable[_T]) -> asyncio.Future[_T]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _progressing(self, log: _Log, waited: asyncio.Future[_T], what: str) -> _T:
        """``waited``'s result, failing only when the queue's consumer received nothing for ``operation_timeout``
        (a replay of a long stream takes as long as it takes)."""
        while True:
            received = log.received
            try:
                return await asyncio.wait_for(asyncio.shield(waited), self.operation_timeout)
            except asyncio.TimeoutError:
                if log.received == received:
                    raise self._channels.endpoint.unavailable(
                        f"{what} of queue {log.queue!r} on {self.describe()}: nothing arrived within "
                        f"{self.operation_timeout:g}s"
                    ) from None

    # -- following a queue's stream -----------------------------------------------------------------

    def _log_of(self, queue: str) -> _Log:
        log = self._logs.get(queue)
        if log is None:
            log = self._logs[queue] = _Log(queue, records_stream_name(queue))
        return log

    async def _attached(self, queue: str) -> _Log:
        """The queue's log, its consumer subscribed and its stream replayed up to a barrier (on first use; the
        stream is declared if missing)."""
        log = await self._following(queue, create=True)
        assert log is not None
        return log

    async def _following(self, queue: str, *, create: bool) -> _Log | None:
        """As ``_attached``; without ``create``, None when the queue has no stream (no record was ever written
        there): reads never declare one, so a process that only looks (or consumes a dead-letter queue) leaves
        no stream behind."""
        await self._ensure_connected()
        log = self._log_of(queue)
        for _ in range(2):
            attaching = log.attaching
            if attaching is None or (attaching.done() and (log.tag is None or not _succeeded(attaching))):
                attaching = log.attaching = self._spawn(self._attach(log, create=create))
            await self._progressing(log, attaching, "following the records")
            if log.tag is not None or not create:
                break
            # What we waited for was a look-up that found no stream; this write declares it.
        return log if log.tag is not None else None

    async def _attach(self, log: _Log, *, create: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.operation_timeout
        backoff = 0.02
        while log.tag is None:
            try:
                if not await self._subscribe(log, passive=not create):
                    return  # no stream, and only a look-up asked
            except (_NotReady, BackendUnavailableError) as exc:
                # A stream just declared (here or by another process) refuses consumers until its writer has
                # started; RabbitMQ 3.10 may even close the whole connection then (INTERNAL_ERROR), which
                # reconnects by itself.
                if loop.time() >= deadline:
                    if isinstance(exc, BackendUnavailableError):
                        raise
                    raise self._channels.endpoint.unavailable(
                        f"cannot follow the record stream {log.stream} on {self.describe()}: {exc}"
                    ) from None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RETRY_CAP)
        await self._publish(log, {"m": "sync"})

    async def _declare(self, stream: str, *, passive: bool) -> bool:
        """Declare the stream (passive: only see whether it exists); False when passive and it does not."""
        with self._channels.boundary():
            async with self._channels.ops_channel() as channel:
                try:
                    await channel.declare_queue(
                        stream,
                        durable=True,
                        passive=passive,
                        arguments=None if passive else records_stream_arguments(self.max_age),
                        timeout=self.operation_timeout,
                    )
                except ChannelNotFoundEntity as exc:
                    # NOT_FOUND also says "home node ... of durable queue ... is down or inaccessible" while a
                    # restarted node brings its streams back: only "no queue" means it is gone.
                    if "no queue" not in str(exc):
                        raise _NotReady(str(exc)) from exc
                    return False
                except ChannelPreconditionFailed as exc:  # declared with another max_age elsewhere: use it as is
                    logger.debug("the record stream %s exists with other arguments: %s", stream, exc)
        return True

    async def _subscribe(self, log: _Log, *, passive: bool) -> bool:
        """Consume the stream from its start (or after the last event folded); False if passive and it is gone."""
        async with log.subscribing:
            if log.tag is not None:
                return True  # subscribed meanwhile (a resume and a first use at once)
            return await self._consume(log, passive=passive)

    async def _consume(self, log: _Log, *, passive: bool) -> bool:
        if not await self._declare(log.stream, passive=passive):
            return False
        with self._channels.boundary():
            channel = await self._channels.open_channel(prefetch=_PREFETCH)
            try:
                underlay = await channel.get_underlay_channel()
                tag = f"mindtrace.records.{uuid.uuid4().hex}"
                # The log holds the tag before basic.consume goes out, so a basic.cancel read right behind the
                # consume-ok (the stream deleted meanwhile) is not ignored.
                log.channel, log.underlay, log.tag = channel, underlay, tag
                channel.close_callbacks.add(functools.partial(self._on_channel_closed, log))
                _on_consumer_cancel(underlay, functools.partial(self._on_consumer_cancelled, log))
                offset: int | str = "first" if log.offset is None else log.offset + 1
                try:
                    await underlay.basic_consume(
                        log.stream,
                        functools.partial(self._deliver, log, tag),
                        no_ack=False,
                        consumer_tag=tag,
                        arguments={"x-stream-offset": offset},
                        timeout=self.operation_timeout,
                    )
                except ChannelPreconditionFailed as exc:
                    raise _NotReady(str(exc)) from exc
            except BaseException:
                if log.channel is channel:
                    log.channel = log.underlay = log.tag = None
                await self._channels.discard(channel)
                raise
        return True

    def _on_channel_closed(self, log: _Log, channel: Any, exc: BaseException | None = None) -> None:
        if channel is not log.channel:
            return
        log.channel = log.underlay = log.tag = None
        if not self._closed:
            logger.info("record stream of %r lost (%s), following it again", log.queue, exc)
            log.attaching = self._spawn(self._resume(log))

    def _on_consumer_cancelled(self, log: _Log, frame: spec.Basic.Cancel) -> None:
        if frame.consumer_tag is None or frame.consumer_tag != log.tag:
            return
        # The broker cancels stream consumers when the stream is deleted (the records are gone), and also when
        # its node goes down: follow it again after the last event folded if it is still there.
        channel = log.channel
        log.channel = log.underlay = log.tag = None
        if channel is not None:
            self._spawn(self._channels.discard(channel))
        if not self._closed:
            log.attaching = self._spawn(self._resume(log))

    async def _resume(self, log: _Log) -> None:
        """After a lost channel: consume again after the last event folded, then wake every watch."""
        backoff = _RETRY_BASE
        while not self._closed:
            try:
                if not await self._subscribe(log, passive=True):
                    self._reset(log)  # deleted while we were away
                    return
                break
            except (BackendError, ClosedError, ChannelInvalidStateError, _NotReady) as exc:
                logger.debug("following the records of %r again failed, retrying: %s", log.queue, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RETRY_CAP)
        log.wake_all()

    def _reset(self, log: _Log) -> None:
        """Forget the queue's records and its consumer (the stream is gone); the next use follows it anew."""
        log.channel = log.underlay = log.tag = None
        log.attaching = None
        log.offset = None
        log.records.clear()
        log.keys.clear()
        log.expiry.clear()
        log.wake_all()

    async def _deliver(self, log: _Log, tag: str, message: DeliveredMessage) -> None:
        # Each delivery runs as a task of its own, in order: all that must happen in stream order is done before
        # the first await (there is none).
        if tag != log.tag:
            return  # a delivery of a consumer given up
        log.received += 1
        headers = message.header.properties.headers or {}
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int) and not isinstance(offset, bool):
            if log.offset is not None and offset <= log.offset:
                return  # already folded (a resumed consumer starts at a chunk boundary)
            log.offset = offset
        self._fold(log, message.body)
        log.last_tag = getattr(message.delivery, "delivery_tag", None)  # a basic.deliver's (aiormq 6 and 7)
        log.unacked += 1
        if log.unacked >= _ACK_EVERY:
            self._ack(log)
        elif not log.ack_scheduled:
            log.ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._ack, log)

    def _ack(self, log: _Log) -> None:
        """Ack what the consumer was given so far (one ack for many): a stream consumer's credit."""
        log.ack_scheduled = False
        if log.unacked and log.last_tag is not None and log.underlay is not None:
            log.unacked = 0
            self._spawn(self._send_ack(log.underlay, log.last_tag))

    @staticmethod
    async def _send_ack(underlay: Any, delivery_tag: int) -> None:
        with contextlib.suppress(Exception):  # a channel gone took its deliveries with it
            await underlay.basic_ack(delivery_tag, multiple=True)

    # -- the fold -----------------------------------------------------------------------------------

    def _fold(self, log: _Log, body: bytes) -> None:
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            marker = data.get("m")
            result: Any = None
            if marker is None:
                self._apply(log, StateUpdate.from_fields(data))
            elif marker == "cancel":
                result = self._fold_cancel(log, data)
            elif marker == "purge":
                self._fold_purge(log, float(data["at"]))
            # "sync" (a barrier) changes nothing; unknown markers come from newer writers.
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring an unreadable event on %s: %s", log.stream, exc)
            return
        future = self._pending.get(str(data.get("e", "")))
        if future is not None and not future.done():
            future.set_result(result)

    def _apply(self, log: _Log, update: StateUpdate) -> JobInfo:
        now = time.time()
        self._expire(log, now)
        current = log.read(update.job_id, now)
        after = current.apply(update)
        if after is not current:
            if update.kind == "published" and update.dedup_key is not None:
                log.keys[update.dedup_key] = update.job_id
            elif after.terminal and after.dedup_key is not None and log.keys.get(after.dedup_key) == update.job_id:
                del log.keys[after.dedup_key]
            if after.status is JobStatus.UNKNOWN:
                log.records.pop(update.job_id, None)
            else:
                log.records[update.job_id] = after
                if after.expires_at is not None:
                    heapq.heappush(log.expiry, (after.expires_at.timestamp(), update.job_id))
            log.wake(update.job_id)
        return after

    def _fold_cancel(self, log: _Log, data: dict[str, Any]) -> CancelOutcome:
        job_id, at, reason = str(data["id"]), float(data["at"]), data.get("reason")
        info = log.read(job_id, time.time())
        if info.status is JobStatus.UNKNOWN:
            return CancelOutcome.NOT_FOUND
        if info.terminal:
            return CancelOutcome.ALREADY_FINISHED
        if info.status is JobStatus.RUNNING:
            self._apply(log, StateUpdate(job_id, JobStatus.RUNNING, at, reason=reason, kind="cancel"))
            for callback in list(log.listeners):
                try:
                    callback(job_id, reason)
                except Exception:
                    logger.exception("a cancel listener of %r failed on job %s", log.queue, job_id)
            return CancelOutcome.CANCELLING
        ttl = float(data.get("ttl", self.cancelled_ttl))
        self._apply(log, StateUpdate(job_id, JobStatus.CANCELLED, at, info.attempts, reason=reason, ttl=ttl))
        return CancelOutcome.CANCELLED

    def _fold_purge(self, log: _Log, at: float) -> None:
        for job_id, info in list(log.records.items()):
            enqueued = info.enqueued_at
            if info.status is JobStatus.QUEUED and enqueued is not None and enqueued.timestamp() <= at:
                del log.records[job_id]
                log.wake(job_id)

    @staticmethod
    def _expire(log: _Log, now: float) -> None:
        while log.expiry and log.expiry[0][0] <= now:
            _, job_id = heapq.heappop(log.expiry)
            info = log.records.get(job_id)
            if info is not None and info.expired(now):
                del log.records[job_id]

    def _read(self, log: _Log, job_id: str) -> JobInfo:
        if self._closed:
            raise ClosedError(f"the state store {self.describe()} is closed")
        return log.read(job_id, time.time())

    # -- publishing events --------------------------------------------------------------------------

    async def _publish(self, log: _Log, event: dict[str, Any], *, unroutable: bool = False, folded: bool = True) -> Any:
        """Publish ``event`` to the queue's stream (confirmed) and, if ``folded``, return once this store folded
        it: what the fold made of it (a cancel's outcome, else None). A stream that takes no events raises
        BackendUnavailableError, or _StreamGone with ``unroutable`` (to tell a deleted stream from one starting)."""
        # Unfolded, confirmed is enough: a read in this process sends a barrier after it, which the fold reaches.
        key = f"{self._name}-{next(self._serial)}" if folded else None
        body = json.dumps(event if key is None else {**event, "e": key}, separators=(",", ":")).encode()
        future: asyncio.Future[Any] | None = None
        if key is not None:
            future = self._pending[key] = asyncio.get_running_loop().create_future()
        try:
            try:
                await self._send(log, body, str(event.get("id", "")))
            except _StreamGone:
                if unroutable:
                    raise
                raise self._not_taking(log) from None
            return None if future is None else await self._progressing(log, future, "reading back an event")
        finally:
            if key is not None:
                self._pending.pop(key, None)

    async def _send(self, log: _Log, body: bytes, job_id: str) -> None:
        """Publish one event (mandatory, confirmed); sent once more on a fresh channel if nothing was sent."""
        properties = spec.Basic.Properties(message_id=job_id or None, delivery_mode=2)
        for attempt in (1, 2):
            with self._channels.boundary():
                channel = await self._channels.confirm_channel()
                underlay = await channel.get_underlay_channel()
                try:
                    await underlay.basic_publish(
                        body,
                        exchange="",
                        routing_key=log.stream,
                        properties=properties,
                        mandatory=True,
                        timeout=self.operation_timeout,
                    )
                    return
                except aiormq.exceptions.PublishError as exc:
                    if getattr(exc.frame, "reply_code", None) == _NO_ROUTE:
                        raise _StreamGone(log.stream) from exc
                    raise
                except ChannelInvalidStateError:
                    # Raised before anything was written: the channel (or its connection) had closed.
                    if attempt == 2:
                        raise

    async def _write(self, queue: str, event: dict[str, Any], *, folded: bool = True) -> Any:
        """Publish ``event`` to the queue's stream (see ``_publish``); a stream deleted meanwhile is followed anew
        and written again."""
        log = await self._attached(queue)
        try:
            return await self._publish(log, event, unroutable=True, folded=folded)
        except _StreamGone:
            try:
                exists = await self._declare(log.stream, passive=True)
            except _NotReady:
                exists = True
            if exists:
                raise self._not_taking(log) from None
            self._reset(log)  # deleted by another process's forget_queue: the queue starts with no records
        return await self._publish(await self._attached(queue), event, folded=folded)

    def _not_taking(self, log: _Log) -> BackendError:
        return self._channels.endpoint.unavailable(
            f"the record stream {log.stream} on {self.describe()} takes no events (is its node starting?)"
        )

    async def _sync(self, log: _Log) -> None:
        """Return once this store folded every event confirmed before the call (one barrier event serves every
        caller that arrived before it was sent)."""
        waiter = log.next_sync
        if waiter is None:
            waiter = log.next_sync = asyncio.get_running_loop().create_future()
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._spawn(self._send_barrier(log, waiter))
        await asyncio.shield(waiter)

    async def _send_barrier(self, log: _Log, waiter: asyncio.Future[None]) -> None:
        async with log.sync_lock:
            if log.next_sync is waiter:
                log.next_sync = None  # callers from now on wait for the next barrier
            try:
                await self._publish(log, {"m": "sync"})
            except BaseException as exc:
                if not waiter.done():
                    waiter.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            if not waiter.done():
                waiter.set_result(None)

    # -- the contract: writes -----------------------------------------------------------------------

    async def record(self, queue: str, update: StateUpdate) -> None:
        # Returns once confirmed: this process's reads send a barrier after it, so they still see it.
        await self._write(queue, update.to_fields(), folded=False)

    async def record_unique(self, queue: str, update: StateUpdate) -> str:
        # Best effort: the fold is read up to a barrier, then the record appended, so a publish sequenced after
        # another (in any process) sees its record; two racing through that gap may both record and publish.
        log = await self._following(queue, create=False)
        if log is not None and update.dedup_key is not None:
            await self._sync(log)
            holder = log.keys.get(update.dedup_key)
            if holder is not None and holder != update.job_id and self._read(log, holder).holds_key():
                return holder
        await self._write(queue, update.to_fields(), folded=False)
        return update.job_id

    async def started(self, queue: str, update: StateUpdate) -> str | None:
        # RUNNING returns once this store's fold has it, so the cancel check after it reads every cancel folded
        # before it, and a cancel folded after it finds the job running and reaches its listener.
        await self._write(queue, update.to_fields())
        return await self.cancel_requested(queue, update.job_id)

    async def purged(self, queue: str, at: float) -> None:
        if await self._following(queue, create=False) is not None:  # no stream: no records to forget
            await self._write(queue, {"m": "purge", "at": repr(at)})

    async def forget_queue(self, queue: str) -> None:
        await self._ensure_connected()
        stream = records_stream_name(queue)
        with self._channels.boundary():
            async with self._channels.ops_channel() as ops:
                underlay = await ops.get_underlay_channel()
                with contextlib.suppress(ChannelNotFoundEntity):
                    await underlay.queue_delete(stream, timeout=self.operation_timeout)
        log = self._logs.get(queue)
        if log is not None:
            channel = log.channel
            self._reset(log)
            if channel is not None:
                await self._channels.discard(channel)

    # -- the contract: reads ------------------------------------------------------------------------

    async def info(self, queue: str, job_id: str) -> JobInfo:
        log = await self._following(queue, create=False)
        if log is None:
            return JobInfo(job_id=job_id, queue=queue)
        await self._sync(log)
        return self._read(log, job_id)

    def watch(self, queue: str, job_id: str) -> Watch:
        return _RabbitMQWatch(self, queue, job_id)

    # -- the contract: cancellation -----------------------------------------------------------------

    async def cancel(self, queue: str, job_id: str, reason: str | None = None) -> CancelOutcome:
        event: dict[str, Any] = {"m": "cancel", "id": job_id, "at": repr(time.time()), "ttl": repr(self.cancelled_ttl)}
        if reason is not None:
            event["reason"] = reason
        if await self._following(queue, create=False) is None:
            return CancelOutcome.NOT_FOUND  # no record was ever written on the queue
        outcome = await self._write(queue, event)
        return outcome if isinstance(outcome, CancelOutcome) else CancelOutcome.NOT_FOUND

    async def cancel_requested(self, queue: str, job_id: str) -> str | None:
        # Local: the consumer asks in started(), right after its RUNNING write returned once this fold had it.
        log = await self._following(queue, create=False)
        if log is None:
            return None
        info = self._read(log, job_id)
        if info.cancel_requested or info.status is JobStatus.CANCELLED:
            return info.reason or ""
        return None

    async def listen_cancels(self, queue: str, callback: CancelCallback) -> CancelListener:
        # Heard from the fold of the queue's stream, which this store follows from its first record there on
        # (a queue with no stream yet is followed from the consumer's first RUNNING write).
        listener = _RabbitMQListener(self._log_of(queue), callback)
        try:
            await self._following(queue, create=False)
        except BaseException:
            await listener.close()
            raise
        return listener


def _succeeded(future: asyncio.Future[Any]) -> bool:
    return not future.cancelled() and future.exception() is None
