"""LocalClient: in-memory queues in one process, with the same delivery semantics as the brokers."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
from mindtrace.jobs.clock import SYSTEM_CLOCK, Clock, Timer
from mindtrace.jobs.constants import MAX_PAYLOAD_BYTES
from mindtrace.jobs.errors import ConfigurationError, QueueConflictError, QueueNotFoundError
from mindtrace.jobs.lifecycle import StateUpdate
from mindtrace.jobs.state.memory import MemoryStateStore

if TYPE_CHECKING:
    from mindtrace.jobs.schedules import MemoryScheduleStore

# Heap entries sort by (-priority, sequence): higher priority first, FIFO among equals (a sequence number is
# never repeated, so the body and id are never compared). The id is the job id the entry holds in its queue,
# or None for a dead-lettered message: as on Redis, a dead-letter queue keys its messages by its own sequence.
_Entry = tuple[int, int, bytes, str | None]


@dataclass(slots=True)
class _Queue:
    options: QueueOptions
    ready: list[_Entry] = field(default_factory=list)
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    timers: set[Timer] = field(default_factory=set)
    #: Jobs waiting for a delay (a delayed publish, a retry), by id: the timer that makes each ready, its entry.
    delayed: dict[str, tuple[Timer, _Entry]] = field(default_factory=dict)
    #: Job ids the queue holds (ready, claimed, or waiting for a delay); a publish of one is a no-op.
    held: set[str] = field(default_factory=set)
    #: Messages claimed from the queue and not yet settled.
    claimed: int = 0
    deleted: bool = False

    def push(self, entry: _Entry) -> None:
        heapq.heappush(self.ready, entry)
        self.wake_one()

    def wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def wake_all(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class _LocalReceiver(Receiver):
    def __init__(self, client: LocalClient, queue: str) -> None:
        super().__init__(client, queue)
        self._client = client

    async def _get(self, deadline: float | None) -> Delivery | None:
        loop = asyncio.get_running_loop()
        while True:
            q = self._client._get_queue(self._queue)
            if q.ready:
                neg_priority, seq, body, job_id = heapq.heappop(q.ready)
                q.claimed += 1
                return Delivery(self._queue, body, -neg_priority, handle=(seq, job_id, q))
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            waiter: asyncio.Future[None] = loop.create_future()
            q.waiters.append(waiter)
            try:
                await asyncio.wait({waiter}, timeout=remaining)
            finally:
                if not waiter.done():
                    waiter.cancel()
                elif q.ready and not waiter.cancelled():
                    # Woken but leaving (cancelled or looping): make sure the wake-up is not lost.
                    q.wake_one()
            self._check_open()

    async def close(self) -> None:
        return None


class LocalClient(Backend):
    """In-memory backend for tests and single-process use: per-queue priority heaps, no polling.

    Same semantics as the brokers (priority then FIFO, claimed jobs held until settled, released jobs go
    back to their place, dead-letter queues, a job id queued once while its queue holds it, as on Redis),
    but nothing survives the process. Safe for many concurrent producers and consumers on one event loop;
    bound to that loop.
    """

    schemes = ("memory",)

    capabilities = Capabilities(
        lease_timeout=None,  # in-process: a holder cannot die without the queues going with it
        counted_deliveries=True,
        exact_delays=True,
        max_delay=None,
        priority_levels=PRIORITY_LEVELS,
        queued_job_removal="remove",
        can_list_queues=True,
        shared_queues=False,
        unique_job_ids=True,  # each queue keeps the set of job ids it holds
        job_records=True,  # MemoryStateStore, written inside each publish and settle
        queue_counts=frozenset({"ready", "running", "delayed", "dead_lettered"}),
        schedules="atomic",  # one process: the cursor's compare-and-set and the publish run on one loop
    )

    def __init__(self, *, max_payload_bytes: int = MAX_PAYLOAD_BYTES, clock: Clock | None = None) -> None:
        """``clock``: the clock delays run on (default: the system's); a test gives a ``FakeClock`` to move time
        by hand (see :mod:`mindtrace.jobs.clock`)."""
        super().__init__(max_payload_bytes=max_payload_bytes)
        if clock is not None and not isinstance(clock, Clock):
            raise ConfigurationError(f"clock must be a mindtrace.jobs.clock.Clock, not {type(clock).__name__}")
        self.clock = SYSTEM_CLOCK if clock is None else clock
        self._queues: dict[str, _Queue] = {}
        self._sequence = itertools.count()
        self._state = MemoryStateStore(self)
        self._schedules: MemoryScheduleStore | None = None

    def state_store(self) -> MemoryStateStore:
        """This client's job records: in-process, written inside each publish and settle."""
        return self._state

    def schedule_store(self) -> MemoryScheduleStore:
        """This client's schedules: in-process, on its clock."""
        if self._schedules is None:
            from mindtrace.jobs.schedules import MemoryScheduleStore

            self._schedules = MemoryScheduleStore(self.clock)
        return self._schedules

    def _record(self, queue: str, state: StateUpdate | None) -> None:
        if state is not None:
            self._state.apply(queue, state)

    def _take_out(self, queue: str, job_id: str) -> bool:
        """Remove the queued (ready, or waiting for a retry delay) job ``job_id`` from ``queue``; whether it was
        there. A claimed job is not touched."""
        q = self._queues.get(queue)
        if q is None or job_id not in q.held:
            return False
        delayed = q.delayed.pop(job_id, None)
        if delayed is not None:
            delayed[0].cancel()
            q.timers.discard(delayed[0])
            q.held.discard(job_id)
            return True
        for index, entry in enumerate(q.ready):
            if entry[3] == job_id:
                q.ready[index] = q.ready[-1]
                q.ready.pop()
                heapq.heapify(q.ready)
                q.held.discard(job_id)
                return True
        return False

    @classmethod
    def from_url(cls, url: str = "memory://", **kwargs: Any) -> LocalClient:
        """A new in-memory backend; the URL (``memory://``) carries no settings."""
        return cls(**kwargs)

    def describe(self) -> str:
        return "memory://"

    def _get_queue(self, queue: str) -> _Queue:
        q = self._queues.get(queue)
        if q is None:
            raise QueueNotFoundError(queue)
        return q

    async def _connect(self) -> None:
        return None

    async def _close(self) -> None:
        for q in self._queues.values():
            for timer in q.timers:
                timer.cancel()
            q.deleted = True
            q.wake_all()

    async def _declare_queue(self, queue: str, options: QueueOptions) -> None:
        existing = self._queues.get(queue)
        if existing is None:
            self._queues[queue] = _Queue(options)
        elif existing.options != options:
            raise QueueConflictError(
                f"queue {queue!r} exists with options {existing.options}, not {options}", queue=queue
            )

    async def _queue_exists(self, queue: str) -> bool:
        return queue in self._queues

    async def _publish(self, queue: str, message: OutgoingMessage) -> str:
        return (await self._publish_many(queue, [message]))[0]

    async def _publish_many(self, queue: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        q = self._get_queue(queue)
        held = q.held
        ids = []
        for message in messages:
            job_id = message.job_id
            holder = None if message.state is None else self._state.holder(queue, message.state)
            ids.append(job_id if holder is None else holder)
            if holder is None and job_id not in held:  # a job the queue holds already is not queued twice
                held.add(job_id)
                self._record(queue, message.state)
                entry = (-message.priority, next(self._sequence), message.body, job_id)
                if message.delay > 0:
                    self._hold(q, entry, message.delay)
                else:
                    q.push(entry)
        return ids

    def _hold(self, q: _Queue, entry: _Entry, delay: float) -> None:
        """Keep ``entry`` out of ``q`` until ``delay`` seconds on this client's clock have passed."""
        job_id = entry[3]

        def fire() -> None:
            q.timers.discard(timer)
            if job_id is not None:
                q.delayed.pop(job_id, None)
            if not q.deleted:
                q.push(entry)

        timer = self.clock.call_at(self.clock.time() + delay, fire)
        q.timers.add(timer)
        if job_id is not None:
            q.delayed[job_id] = (timer, entry)

    async def _open_receiver(self, queue: str, prefetch: int, worker: str | None = None) -> Receiver:
        self._get_queue(queue)
        return _LocalReceiver(self, queue)

    @staticmethod
    def _forget(delivery: Delivery) -> None:
        """The job leaves the queue it was claimed from: its id may be published there again."""
        _, job_id, source = delivery.handle
        if job_id is not None:
            source.held.discard(job_id)

    @staticmethod
    def _unclaim(delivery: Delivery) -> None:
        """The claim is settled: the queue it came from counts one running message fewer."""
        source: _Queue = delivery.handle[2]
        source.claimed = max(0, source.claimed - 1)

    async def _ack(self, delivery: Delivery, state: StateUpdate | None = None) -> None:
        self._unclaim(delivery)
        self._record(delivery.queue, state)
        self._forget(delivery)

    async def _release(self, delivery: Delivery, state: StateUpdate | None = None) -> None:
        self._unclaim(delivery)
        q = self._queues.get(delivery.queue)
        if q is not None:
            self._record(delivery.queue, state)
            seq, job_id, _ = delivery.handle
            if job_id is not None:
                q.held.add(job_id)
            q.push((-delivery.priority, seq, delivery.body, job_id))

    async def _retry(
        self, delivery: Delivery, message: OutgoingMessage, delay: float, state: StateUpdate | None = None
    ) -> None:
        self._unclaim(delivery)
        q = self._get_queue(delivery.queue)
        self._record(delivery.queue, state)
        # The retry replaces the message under the id it was claimed with, as retry.lua does; it stays held.
        job_id = delivery.handle[1]
        if job_id is not None:
            q.held.add(job_id)
        entry = (-message.priority, next(self._sequence), message.body, job_id)
        if delay <= 0:
            q.push(entry)
        else:
            self._hold(q, entry, delay)

    async def _dead_letter(
        self, delivery: Delivery, dead_letter_queue: str, message: OutgoingMessage, state: StateUpdate | None = None
    ) -> None:
        self._unclaim(delivery)
        q = self._queues.get(dead_letter_queue)
        if q is None:
            q = self._queues[dead_letter_queue] = _Queue(self._get_queue(delivery.queue).options)
        self._record(delivery.queue, state)
        self._forget(delivery)
        q.push((-message.priority, next(self._sequence), message.body, None))

    async def _count(self, queue: str) -> int:
        return len(self._get_queue(queue).ready)

    async def _list_queues(self) -> list[str]:
        return list(self._queues)

    async def _queue_stats(self, queue: str) -> QueueStats:
        q = self._get_queue(queue)
        dlq_name = dead_letter_queue_name(queue)
        dlq = self._queues.get(dlq_name) if dlq_name != queue else None
        dead = 0 if dlq is None else len(dlq.ready) + dlq.claimed + len(dlq.timers)
        return QueueStats(queue, len(q.ready), running=q.claimed, delayed=len(q.timers), dead_lettered=dead)

    async def _peek(self, queue: str, limit: int) -> list[bytes]:
        # The heap's smallest entries are the next claims, in order; nsmallest copies, the heap is untouched.
        return [entry[2] for entry in heapq.nsmallest(limit, self._get_queue(queue).ready)]

    async def _purge(self, queue: str) -> int:
        q = self._get_queue(queue)
        removed = len(q.ready)
        purged = [entry[3] for entry in q.ready if entry[3] is not None]
        q.held.difference_update(purged)
        q.ready.clear()
        self._state.forget(queue, purged)
        return removed

    async def _delete_queue(self, queue: str) -> None:
        q = self._queues.pop(queue, None)
        await self._state.forget_queue(queue)
        if q is not None:
            q.deleted = True
            for timer in q.timers:
                timer.cancel()
            q.wake_all()
