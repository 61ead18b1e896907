"""RabbitMQStateStore: job records as events on one RabbitMQ stream per queue, folded in every process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiormq.exceptions import ChannelNotFoundEntity

from mindtrace.jobs.backends.rabbitmq.streams import NotReady, StreamFollower, StreamGone
from mindtrace.jobs.backends.rabbitmq.topology import records_stream_arguments, records_stream_name
from mindtrace.jobs.constants import AMQP_RECORDS_MAX_AGE, RESULT_TTL
from mindtrace.jobs.errors import BackendError, ClosedError
from mindtrace.jobs.lifecycle import CancelOutcome, JobInfo, JobStatus, StateUpdate
from mindtrace.jobs.state.base import CancelCallback, CancelListener, StateCapabilities, StateStore, Watch, changed

if TYPE_CHECKING:
    from mindtrace.jobs.backends.rabbitmq.connection import _Channels

logger = logging.getLogger("mindtrace.jobs")

_RETRY_BASE, _RETRY_CAP = 0.1, 2.0


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
    #: The stream's consumer, folding its events into this log (set by ``RabbitMQStateStore._log_of``).
    follower: StreamFollower = field(init=False)

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
                        await asyncio.wait_for(log.follower.sync(), limit)
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
        logs = list(self._logs.values())
        for log in logs:
            log.follower.close()
        for log in logs:
            await log.follower.wait_closed()
            log.listeners.clear()
            log.wake_all()  # their next read says the store is closed
        await self._channels.close()

    # -- following a queue's stream -----------------------------------------------------------------

    def _log_of(self, queue: str) -> _Log:
        log = self._logs.get(queue)
        if log is None:
            log = self._logs[queue] = _Log(queue, records_stream_name(queue))
            log.follower = StreamFollower(
                self._channels,
                log.stream,
                fold=functools.partial(self._fold, log),
                arguments=lambda: records_stream_arguments(self.max_age),
                barrier=lambda key: {"m": "sync", "e": key},
                label="record stream",
                owner="the state store",
                tag_prefix="mindtrace.records.",
                reading=f"reading back an event of queue {queue!r}",
                # Resumes never declare: a stream deleted while the consumer was away leaves the queue no records.
                passive_resume=True,
                replay=True,
                on_gone=functools.partial(self._reset, log),
                on_resumed=log.wake_all,
                publish_barrier=functools.partial(self._publish_barrier, log),
                first_backoff=0.02,
                retry_cap=_RETRY_CAP,
            )
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
            following = await log.follower.following(
                passive=not create, what=f"following the records of queue {queue!r}"
            )
            if following or not create:
                break
            # What we waited for was a look-up that found no stream; this write declares it.
        return log if log.follower.tag is not None else None

    def _reset(self, log: _Log) -> None:
        """Forget the queue's records and its consumer (the stream is gone); the next use follows it anew."""
        log.follower.reset()
        log.records.clear()
        log.keys.clear()
        log.expiry.clear()
        log.wake_all()

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
        log.follower.resolve(str(data.get("e", "")), result)

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
        BackendUnavailableError, or StreamGone with ``unroutable`` (to tell a deleted stream from one starting)."""
        # Unfolded, confirmed is enough: a read in this process sends a barrier after it, which the fold reaches.
        follower = log.follower
        key, future = follower.expect() if folded else (None, None)
        body = json.dumps(event if key is None else {**event, "e": key}, separators=(",", ":")).encode()
        try:
            try:
                await follower.send(body, message_id=str(event.get("id", "")) or None)
            except StreamGone:
                if unroutable:
                    raise
                raise self._not_taking(log) from None
            return (
                None
                if future is None
                else await follower.progressing(future, f"reading back an event of queue {log.queue!r}")
            )
        finally:
            if key is not None:
                follower.forget(key)

    async def _publish_barrier(self, log: _Log, body: bytes) -> None:
        try:
            await log.follower.send(body)
        except StreamGone:
            raise self._not_taking(log) from None

    async def _write(self, queue: str, event: dict[str, Any], *, folded: bool = True) -> Any:
        """Publish ``event`` to the queue's stream (see ``_publish``); a stream deleted meanwhile is followed anew
        and written again."""
        log = await self._attached(queue)
        try:
            return await self._publish(log, event, unroutable=True, folded=folded)
        except StreamGone:
            try:
                exists = await log.follower.declare(passive=True)
            except NotReady:
                exists = True
            if exists:
                raise self._not_taking(log) from None
            self._reset(log)  # deleted by another process's forget_queue: the queue starts with no records
        return await self._publish(await self._attached(queue), event, folded=folded)

    def _not_taking(self, log: _Log) -> BackendError:
        return self._channels.endpoint.unavailable(
            f"the record stream {log.stream} on {self.describe()} takes no events (is its node starting?)"
        )

    # -- the contract: writes -----------------------------------------------------------------------

    async def record(self, queue: str, update: StateUpdate) -> None:
        # Returns once confirmed: this process's reads send a barrier after it, so they still see it.
        await self._write(queue, update.to_fields(), folded=False)

    async def record_unique(self, queue: str, update: StateUpdate) -> str:
        # Best effort: the fold is read up to a barrier, then the record appended, so a publish sequenced after
        # another (in any process) sees its record; two racing through that gap may both record and publish.
        log = await self._following(queue, create=False)
        if log is not None and update.dedup_key is not None:
            await log.follower.sync()
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
            channel = log.follower.channel
            self._reset(log)
            if channel is not None:
                await self._channels.discard(channel)

    # -- the contract: reads ------------------------------------------------------------------------

    async def info(self, queue: str, job_id: str) -> JobInfo:
        log = await self._following(queue, create=False)
        if log is None:
            return JobInfo(job_id=job_id, queue=queue)
        await log.follower.sync()
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
